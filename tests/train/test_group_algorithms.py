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
