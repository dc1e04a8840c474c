"""GRPO (+ Dr. GRPO, DAPO, GSPO), RLOO, REINFORCE++ and KTO end to end: every config's `:smoke`
runs through the CLI. That GRPO, Dr. GRPO and RLOO raise the synthetic task's ground-truth
reward over the SFT policy is tests/train/test_online.py's check (beside PPO and P3O, sharing
their SFT policy), and KTO's too."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from prefjax.metrics import read_metrics
from tests.train.test_offline import ROOT, load_config

SMOKE = [("grpo_synthetic", "smoke"), ("grpo_synthetic", "smoke,variant=gspo,beta=0.04"),
         ("grpo_synthetic", "smoke,variant=dapo,tis=2.0,reward=verifiable"),
         ("rloo_synthetic", "smoke,algo=reinforce_pp,kl_level=token,tis=2.0"),
         ("kto_synthetic", "smoke")]


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", SMOKE, ids=[f"{n}:{a}" for n, a in SMOKE])
def test_config_smoke_runs_through_the_cli(tmp_path, name, arg):
    cmd = [sys.executable, "-m", "prefjax.main", f"--config=configs/{name}.py:{arg}",
           f"--workdir={tmp_path}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read_metrics(tmp_path)
    assert recs[-1]["step"] == 6 and all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    if name != "kto_synthetic":
        # one model graph samples and trains: the sampler's log-probs are the trainer's
        assert max(r["rollout/logp_mismatch_max"] for r in recs) < 1e-4


def test_bad_group_settings_fail_at_start_naming_the_field():
    from prefjax.losses import records
    from prefjax.pipeline.rollouts import check_online

    for field, value in (("scale_rewards", "std"), ("kl_level", "tokens"),
                         ("num_generations", 0)):
        c = load_config(ROOT / "configs" / "grpo_synthetic.py", "smoke")
        c.online[field] = value
        with pytest.raises(ValueError, match=f"online.{field}"):
            check_online(c, records.get("grpo"))


def grpo_rollouts(tmp_path, monkeypatch, name: str, seen: list | None = None, **online
                  ) -> tuple[list, list[dict]]:
    """(sampled tokens of each rollout [k * B, n], metric records) of a 2-step GRPO smoke run;
    `seen` collects the sampler settings of each rollout."""
    from prefjax.main import run
    from prefjax.pipeline import rollouts
    from prefjax.sampling import sample

    tokens = []

    def recording(*args, **kwargs):
        s = sample(*args, **kwargs)
        tokens.append(np.asarray(s.tokens))
        if seen is not None:
            seen.append(kwargs)
        return s

    monkeypatch.setattr(rollouts, "sample", recording)
    c = load_config(ROOT / "configs" / "grpo_synthetic.py", "smoke")
    c.train.num_steps, c.train.log_every, c.train.eval_every = 2, 1, 100
    c.train.export_hf = False
    for k, v in online.items():
        c.online[k] = v
    run(c, str(tmp_path / name))
    return tokens, [r for r in read_metrics(tmp_path / name) if "loss" in r]


@pytest.mark.slow
def test_rollout_engine_settings_reach_the_sampler(tmp_path, monkeypatch):
    """online.top_k / cache_rows / prefill_buckets / gather_params drive the trainer's
    sampler: with top_k=1 the k samples of each prompt are one greedy response (rows are
    sample-major), which full sampling never gives here; continuous batching over 3 cache rows
    with 2 prefill buckets and the parameters gathered over fsdp samples the same tokens as all
    rows at once, so the runs log the same metrics."""
    c = load_config(ROOT / "configs" / "grpo_synthetic.py", "smoke")
    k = c.online.num_generations
    assert not c.online.gather_params
    base, base_recs = grpo_rollouts(tmp_path, monkeypatch, "base")
    top1, _ = grpo_rollouts(tmp_path, monkeypatch, "top1", top_k=1)
    seen = []
    cont, cont_recs = grpo_rollouts(tmp_path, monkeypatch, "cont", seen, cache_rows=3,
                                    prefill_buckets=2, gather_params=True)
    assert [kw["gather_params"] for kw in seen] == [True] * len(cont)
    assert len(base) == len(top1) == len(cont) == 2
    for t1, t0, tc in zip(top1, base, cont, strict=True):
        groups1, groups0 = t1.reshape(k, -1, t1.shape[-1]), t0.reshape(k, -1, t0.shape[-1])
        assert (groups1 == groups1[:1]).all()
        assert not (groups0 == groups0[:1]).all(axis=(0, 2)).any()
        np.testing.assert_array_equal(tc, t0)
    for a, b in zip(base_recs, cont_recs, strict=True):
        for key in ("loss", "rollout/length", "objective/neg_logp", "objective/entropy"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
