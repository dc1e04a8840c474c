"""perf/tokens_per_sec: the raw batch's real tokens offline; prompt + generated tokens online.

Timing is never asserted: tokens/s divided by steps/s of the same record is tokens per step
(both share the record's window and clock), which is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefjax.main import run
from prefjax.metrics import read_metrics
from prefjax.parallel import make_mesh, shard_batch
from prefjax.train import Checkpointer, abstract_train_state, create_train_state
from prefjax.train.loop import fit
from prefjax.train.step import build_train_step
from tests.train.test_loop import Batches
from tests.train.test_offline import ROOT, load_config
from tests.train.tiny_model import dpo_loss, forward, pair_batch, tiny_model


def per_step(rec: dict, key: str) -> float:
    return rec[key] / rec["perf/steps_per_sec"]


def fit_tiny(workdir, prepare, train_step=None, num_steps=3):
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    opt = optax.sgd(1e-2)
    abstract = abstract_train_state(tiny_model, opt)
    _, sh = create_train_state(tiny_model, opt, mesh=mesh)
    step = build_train_step(dpo_loss, opt, mesh=mesh, state_shardings=sh, forward=forward)
    with Checkpointer(workdir / "ckpt", keep=1, save_every=100) as ckpt:
        fit(lambda: create_train_state(tiny_model, opt, mesh=mesh)[0],
            train_step(step) if train_step else step, Batches(), num_steps=num_steps,
            workdir=str(workdir), checkpointer=ckpt, abstract_state=abstract, shardings=sh,
            prepare=lambda s, raw: prepare(mesh, raw), log_every=1)
    return read_metrics(workdir)


def test_offline_counts_the_raw_batch_real_tokens(tmp_path):
    recs = fit_tiny(tmp_path, lambda mesh, raw: shard_batch(raw, mesh))
    for i, rec in enumerate(recs):
        want = int(pair_batch(4, seed=i)["attention_mask"].sum())
        assert per_step(rec, "perf/tokens_per_sec") == pytest.approx(want, rel=1e-9)
        assert not any(k.endswith(("prompt_tokens_per_sec", "generated_tokens_per_sec"))
                       for k in rec)


def test_reported_token_kinds_are_summed_and_logged_each(tmp_path):
    def prepare(mesh, raw):
        return {"batch": shard_batch(raw, mesh),
                "tokens": {"prompt": jnp.asarray(30), "generated": jnp.asarray(12)}}

    recs = fit_tiny(tmp_path, prepare, train_step=lambda step: lambda s, p: step(s, p["batch"]))
    assert len(recs) == 3
    for rec in recs:
        assert per_step(rec, "perf/tokens_per_sec") == pytest.approx(42, rel=1e-9)
        assert per_step(rec, "perf/prompt_tokens_per_sec") == pytest.approx(30, rel=1e-9)
        assert per_step(rec, "perf/generated_tokens_per_sec") == pytest.approx(12, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo_synthetic", "online_dpo_synthetic"])
def test_online_runs_count_prompt_and_generated_tokens(tmp_path, name):
    """Generated tokens per step = rollout/length x sampled rows; prompt tokens = the real
    tokens of the step's prompts x samples per prompt; the total is their sum."""
    c = load_config(ROOT / "configs" / f"{name}.py", "smoke")
    c.train.num_steps, c.train.log_every, c.train.eval_every = 2, 1, 2
    c.train.export_hf = False
    c.eval.num_prompts = c.train.batch_size
    run(c, str(tmp_path))
    recs = [r for r in read_metrics(tmp_path) if "perf/tokens_per_sec" in r]
    assert len(recs) == 2
    k = 2 if name == "online_dpo_synthetic" else 1  # samples per prompt
    rows = c.train.batch_size * k
    for rec in recs:
        generated = per_step(rec, "perf/generated_tokens_per_sec")
        prompt = per_step(rec, "perf/prompt_tokens_per_sec")
        assert generated == pytest.approx(rec["rollout/length"] * rows, rel=1e-6)
        assert per_step(rec, "perf/tokens_per_sec") == pytest.approx(prompt + generated,
                                                                      rel=1e-9)
        # whole prompts, each counted once per sample, at most max_prompt_length tokens each
        assert prompt == pytest.approx(round(prompt), abs=1e-6) and round(prompt) % k == 0
        assert 0 < prompt <= rows * c.data.max_prompt_length
        assert np.isfinite(rec["perf/steps_per_sec"])
