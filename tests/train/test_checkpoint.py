"""Checkpointer: exact round trip, keep-N, best-by-metric, resharding, partial saves ignored."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from prefjax.parallel import make_mesh
from prefjax.train.checkpoint import Checkpointer
from prefjax.train.state import abstract_train_state, create_train_state
from prefjax.train.step import build_train_step
from tests.train.tiny_model import dpo_loss, forward, pair_batch, tiny_model

OPT = optax.adamw(1e-2, weight_decay=0.1)


def mesh1():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def mesh8():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])


def trained(mesh, steps=1, seed=0):
    state, sh = create_train_state(tiny_model, OPT, mesh=mesh, seed=seed)
    step = build_train_step(dpo_loss, OPT, mesh=mesh, state_shardings=sh, forward=forward)
    for i in range(steps):
        state, _ = step(state, pair_batch(4, seed=i))
    return state, sh, step


def assert_same(a, b):
    for name in ("params", "rest", "opt_state", "step", "rng"):
        la, lb = jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))
        assert jax.tree.structure(getattr(a, name)) == jax.tree.structure(getattr(b, name))
        assert len(la) == len(lb), name
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_round_trip_is_exact_and_training_resumes_identically(tmp_path):
    state, sh, step = trained(mesh1(), steps=1)
    extra = {"data": {"epoch": 1, "position": 17}, "config": {"beta": 0.1, "name": "x"}}
    with Checkpointer(tmp_path, keep=2) as ck:
        assert ck.save(1, state, extra=extra)
        ck.wait()
        restored, got = ck.restore(abstract_state=abstract_train_state(tiny_model, OPT),
                                   shardings=sh)
    assert got == extra
    assert_same(state, restored)
    assert int(restored.step) == 1 and np.asarray(state.rng).dtype == np.uint32
    # The next step from the restored state equals the next step of the uninterrupted run.
    a, ma = step(restored, pair_batch(4, seed=9))
    b, mb = step(state, pair_batch(4, seed=9))
    assert float(ma["loss"]) == float(mb["loss"])
    assert_same(a, b)


def test_keep_n_and_save_every(tmp_path):
    state, _, _ = trained(mesh1(), steps=0)
    with Checkpointer(tmp_path, keep=2, save_every=2) as ck:
        saved = [ck.save(s, state, extra={"s": s}) for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ck.save(7, state, force=True)
        assert not ck.save(7, state, force=True)  # already saved: a no-op, not an error
        ck.wait()
        assert ck.all_steps() == [6, 7]
        assert ck.latest_step() == 7
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["6", "7"]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_metric_is_kept_beside_latest(tmp_path, mode):
    state, _, _ = trained(mesh1(), steps=0)
    values = {1: 3.0, 2: 1.0, 3: 5.0, 4: 2.0, 5: 4.0}
    with Checkpointer(tmp_path, keep=1, best_metric="eval/loss", best_mode=mode) as ck:
        for s, v in values.items():
            ck.save(s, state, metrics={"eval/loss": v, "other": 0.0})
        ck.wait()
        best = 2 if mode == "min" else 3
        assert ck.best_step() == best
        assert ck.all_steps() == sorted({best, 5})
        with pytest.raises(KeyError, match="eval/loss"):
            ck.save(6, state, metrics={"loss": 1.0})


@pytest.mark.parametrize("src,dst", [(mesh8, mesh1), (mesh1, mesh8)])
def test_restore_reshards_between_meshes(tmp_path, src, dst):
    state, _, _ = trained(src(), steps=1)
    target_mesh = dst()
    fresh, target_sh, step = trained(target_mesh, steps=0, seed=1)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, extra={})
        ck.wait()
        restored, _ = ck.restore(1, abstract_state=abstract_train_state(tiny_model, OPT),
                                 shardings=target_sh)
    assert_same(state, restored)
    kernel = restored.params["up"]["kernel"][...]
    assert kernel.sharding == target_sh.params["up"]["kernel"].get_value()
    assert set(kernel.sharding.device_set) == set(target_mesh.devices.flat)
    new, m = step(restored, pair_batch(4, seed=5))  # the step accepts the restored layout
    assert np.isfinite(float(m["loss"])) and int(new.step) == 2
    del fresh


def test_unfinished_tmp_checkpoint_is_ignored(tmp_path):
    state, sh, _ = trained(mesh1(), steps=1)
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state, extra={"which": 1})
    # What a save of step 2 killed before its final rename leaves behind.
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1712345678")
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 1 and ck.all_steps() == [1]
        restored, extra = ck.restore(abstract_state=abstract_train_state(tiny_model, OPT),
                                     shardings=sh)
    assert extra == {"which": 1}
    assert_same(state, restored)


def test_process_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    """A real process exits hard while an async save of a large state is in flight."""
    script = textwrap.dedent(f"""
        import os, jax, jax.numpy as jnp, optax
        from flax import nnx
        from prefjax.parallel import make_mesh
        from prefjax.train.checkpoint import Checkpointer
        from prefjax.train.state import create_train_state

        class Big(nnx.Module):
            def __init__(self, rngs):
                self.w = nnx.Param(jnp.zeros((4096, 4096)))

        mesh = make_mesh({{"data": 1}}, devices=jax.devices()[:1])
        state, _ = create_train_state(Big, optax.sgd(0.1), mesh=mesh)
        ck = Checkpointer({str(tmp_path)!r}, async_save=True)
        ck.save(1, state, extra={{"which": 1}})
        ck.wait()
        ck.save(2, state.replace(step=state.step + 1), extra={{"which": 2}})
        os._exit(1)  # killed before the async save of step 2 commits
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert proc.returncode == 1, proc.stderr[-2000:]
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 1
        _, extra = ck.restore(abstract_state=_big_abstract(), shardings=None)
    assert extra == {"which": 1}


def _big_abstract():
    import jax.numpy as jnp
    from flax import nnx

    class Big(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.zeros((4096, 4096)))

    return abstract_train_state(Big, optax.sgd(0.1))


def test_restore_without_checkpoint_fails_clearly(tmp_path):
    with Checkpointer(tmp_path) as ck, pytest.raises(FileNotFoundError, match="no complete"):
        ck.restore(abstract_state=abstract_train_state(tiny_model, OPT))
