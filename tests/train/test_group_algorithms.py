"""GRPO (+ Dr. GRPO, DAPO, GSPO), RLOO, REINFORCE++ and KTO end to end: every config's `:smoke`
runs through the CLI; from an SFT policy each raises the synthetic task's ground-truth reward.
(GRPO on the verifiable exact-match task is smoke-tested only: from these SFT policies, which
solve 0-2% of prompts, 40 rollouts move the solve rate by about as much as its noise.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from prefjax.main import run
from prefjax.metrics import read_metrics
from tests.train.test_offline import ROOT, load_config
from tests.train.test_online import sft_policy  # noqa: F401  (a module-scoped fixture)

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


def _online(sft, tmp_path, name, arg, steps=24):
    c = load_config(ROOT / "configs" / f"{name}.py", f"init_from={sft}" + (f",{arg}" if arg
                                                                             else ""))
    c.train.num_steps = steps
    c.train.eval_every = steps
    c.train.export_hf = False
    final = run(c, str(tmp_path))
    return final, np.array([r["objective/scores"] for r in read_metrics(tmp_path)])


GROUP = [("grpo_synthetic", ""), ("grpo_synthetic", "variant=dr_grpo"),
         ("rloo_synthetic", ""), ("rloo_synthetic", "algo=reinforce_pp")]


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", GROUP, ids=[f"{n}:{a}" for n, a in GROUP])
def test_group_algorithm_raises_ground_truth_reward_over_sft(sft_policy, tmp_path, name,  # noqa: F811
                                                             arg):
    final, scores = _online(sft_policy, tmp_path, name, arg)
    start, end = scores[0], scores[-4:].mean()  # the first rollout is the SFT policy's
    assert end > start + 0.03, f"{name}:{arg}: r* of rollouts {start:.3f} -> {end:.3f}"
    assert final["reward"] > start + 0.02, (final, start)
    assert np.isfinite(final["kl"]) and final["kl"] > 0


@pytest.mark.slow
def test_kto_raises_ground_truth_reward_over_sft(sft_policy, tmp_path):  # noqa: F811
    c = load_config(ROOT / "configs" / "kto_synthetic.py", f"init_from={sft_policy}")
    c.train.num_steps = 60
    c.train.eval_every = 0
    c.train.export_hf = False
    c.eval.num_prompts = 128
    base = load_config(ROOT / "configs" / "kto_synthetic.py", f"init_from={sft_policy}")
    base.train.num_steps = 1
    base.train.lr = 1e-9  # (lr must be > 0) the SFT policy itself, evaluated the same way
    base.train.export_hf = False
    base.eval.num_prompts = 128
    final = run(c, str(tmp_path / "kto"))
    start = run(base, str(tmp_path / "sft"))
    assert final["sample/reward"] > start["sample/reward"] + 0.03, (start, final)


def test_bad_group_settings_fail_at_start_naming_the_field():
    from prefjax.losses import records
    from prefjax.pipeline.rollouts import check_online

    for field, value in (("scale_rewards", "std"), ("kl_level", "tokens"),
                         ("num_generations", 0)):
        c = load_config(ROOT / "configs" / "grpo_synthetic.py", "smoke")
        c.online[field] = value
        with pytest.raises(ValueError, match=f"online.{field}"):
            check_online(c, records.get("grpo"))
