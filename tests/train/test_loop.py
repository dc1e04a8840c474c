"""fit(): NaN stops the run naming the step, the last good checkpoint stays restorable."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from prefjax.metrics import read_metrics
from prefjax.parallel import make_mesh, shard_batch
from prefjax.train import Checkpointer, abstract_train_state, create_train_state
from prefjax.train.loop import NonFiniteLossError, fit
from prefjax.train.step import build_train_step
from tests.train.tiny_model import dpo_loss, forward, pair_batch, tiny_model


class Batches:
    """Deterministic pair batches with a resumable position; batch `poison` gets NaN refs."""

    def __init__(self, poison: int | None = None):
        self.i, self.poison = 0, poison

    def state(self):
        return {"i": self.i}

    def restore(self, s):
        self.i = s["i"]

    def __next__(self):
        b = pair_batch(4, seed=self.i)
        if self.i == self.poison:
            b["ref_logps"][0] = np.nan
        self.i += 1
        return b


def run(workdir, num_steps, poison=None):
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    opt = optax.adam(1e-2)
    abstract = abstract_train_state(tiny_model, opt)
    _, sh = create_train_state(tiny_model, opt, mesh=mesh)
    step = build_train_step(dpo_loss, opt, mesh=mesh, state_shardings=sh, forward=forward)
    ckpt = Checkpointer(workdir / "ckpt", keep=5, save_every=2)
    with ckpt:
        state = fit(lambda: create_train_state(tiny_model, opt, mesh=mesh)[0], step,
                    Batches(poison), num_steps=num_steps, workdir=str(workdir),
                    checkpointer=ckpt, abstract_state=abstract, shardings=sh,
                    prepare=lambda _, raw: shard_batch(raw, mesh), log_every=1)
    return state, ckpt, abstract, sh


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    clean, *_ = run(tmp_path / "clean", num_steps=4)
    # batch index 4 is the 5th step: steps 1-4 are good and step 4 is checkpointed
    with pytest.raises(NonFiniteLossError, match=r"step 5: non-finite loss .*step 4"):
        run(tmp_path / "nan", num_steps=10, poison=4)
    ckpt = Checkpointer(tmp_path / "nan" / "ckpt")
    assert ckpt.latest_step() == 4
    _, _, abstract, sh = run(tmp_path / "clean", num_steps=4)  # resumes: nothing to do
    state, extra = ckpt.restore(abstract_state=abstract, shardings=sh)
    ckpt.close()
    assert extra["data"] == {"i": 4}
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(clean.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in read_metrics(tmp_path / "nan")]
    assert steps == [1, 2, 3, 4]  # the non-finite step is never logged as a result


def test_log_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="log_every"):
        fit(None, None, Batches(), num_steps=1, workdir=str(tmp_path), checkpointer=None,
            abstract_state=None, shardings=None, prepare=None, log_every=0)
