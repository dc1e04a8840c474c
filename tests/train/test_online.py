"""Online trainers: PPO, P3O and online DPO raise the ground-truth reward of an SFT policy on the
synthetic task; online runs resume exactly after SIGKILL (rollout RNG included)."""

from __future__ import annotations

import numpy as np
import pytest

from prefjax.main import run
from prefjax.metrics import read_metrics
from tests.train.test_offline import ROOT, check_sigkill_resume, load_config


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """A short SFT run (well below the demo's) whose export starts every online run."""
    work = tmp_path_factory.mktemp("sft")
    c = load_config(ROOT / "configs" / "sft_synthetic.py")
    c.data.num_train = 4096
    c.train.num_steps = 150
    c.train.batch_size = 32
    c.train.eval_every = 150
    c.train.save_every = 150
    run(c, str(work))
    return work


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo_synthetic", "p3o_synthetic", "online_dpo_synthetic"])
def test_online_algorithm_raises_ground_truth_reward_over_sft(sft_policy, tmp_path, name):
    c = load_config(ROOT / "configs" / f"{name}.py", f"init_from={sft_policy}")
    c.train.num_steps = 24
    c.train.eval_every = 24
    c.train.export_hf = False
    final = run(c, str(tmp_path))
    recs = read_metrics(tmp_path)
    scores = np.array([r["objective/scores"] for r in recs])
    # rollouts of the first step come from the SFT policy itself
    start, end = scores[0], scores[-4:].mean()
    assert end > start + 0.03, f"{name}: r* of rollouts {start:.3f} -> {end:.3f}"
    assert final["reward"] > start + 0.02, (final, start)
    assert np.isfinite(final["kl"]) and final["kl"] > 0  # it moved away from the reference


@pytest.mark.slow
def test_online_run_resumes_exactly_after_sigkill(tmp_path):
    check_sigkill_resume(tmp_path, "p3o_synthetic")
