"""Mesh construction, logical-axis rules, parameter / batch shardings, sharded state creation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from prefjax import parallel
from prefjax.parallel import (
    DEFAULT_RULES,
    logical_to_sharding,
    make_mesh,
    param_shardings,
    rules_for,
    shard_batch,
)
from prefjax.train.state import abstract_train_state, create_train_state, merge_model
from tests.train.tiny_model import tiny_model


def mesh222():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])


def test_make_mesh_sizes_and_errors():
    m = make_mesh({"data": -1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:8])
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert make_mesh({"fsdp": -1}, devices=jax.devices()[:4]).shape["fsdp"] == 4
    m1 = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    assert m1.devices.size == 1
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        make_mesh({"data": -1, "fsdp": 3}, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"data": -1, "fsdp": -1}, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="mesh.tensor"):
        make_mesh({"tensor": 0}, devices=jax.devices()[:8])


def test_logical_to_sharding_rules_divisibility_and_no_axis_reuse():
    mesh = mesh222()
    assert logical_to_sharding(("embed", "mlp"), mesh).spec == P("fsdp", "tensor")
    assert logical_to_sharding(("vocab", "embed"), mesh).spec == P("tensor", "fsdp")
    assert logical_to_sharding(("norm",), mesh).spec == P(None)
    assert logical_to_sharding(("batch", None), mesh).spec == P(("data", "fsdp"), None)
    # 3 is not divisible by fsdp=2: that dim replicates, the other still shards
    assert logical_to_sharding(("embed", "mlp"), mesh, shape=(3, 8)).spec == P(None, "tensor")
    # heads and mlp both map to tensor: the second use replicates
    assert logical_to_sharding(("heads", "mlp"), mesh).spec == P("tensor", None)
    with pytest.raises(ValueError, match="'experts'.*no sharding rule"):
        logical_to_sharding(("experts", "embed"), mesh)


def test_strategies_are_rule_tables():
    mesh = mesh222()
    dp, fsdp, tp = rules_for("dp"), rules_for("fsdp"), rules_for("tp")
    assert logical_to_sharding(("embed", "mlp"), mesh, dp).spec == P(None, None)
    assert logical_to_sharding(("embed", "mlp"), mesh, fsdp).spec == P("fsdp", None)
    assert logical_to_sharding(("embed", "mlp"), mesh, tp).spec == P(None, "tensor")
    assert rules_for("auto") == DEFAULT_RULES
    for rules in (dp, fsdp, tp):  # the batch always splits over data and fsdp
        assert logical_to_sharding(("batch",), mesh, rules).spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="unknown parallel strategy 'zero3'"):
        rules_for("zero3")


class Mixed(nnx.Module):
    def __init__(self, rngs):
        self.named = nnx.Param(jnp.zeros((4, 6)), out_sharding=("embed", "vocab"))
        self.plain = nnx.Param(jnp.zeros((4, 6)))  # no metadata -> replicated
        self.count = nnx.Variable(jnp.zeros(()))


def test_param_shardings_read_nnx_metadata():
    mesh = mesh222()
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: Mixed(nnx.Rngs(0))))
    sh = param_shardings(state, mesh)
    assert sh["named"].get_value().spec == P("fsdp", "tensor")
    assert sh["plain"].get_value().spec == P()
    assert sh["count"].get_value().spec == P()


def test_create_train_state_shards_and_matches_unsharded_init():
    mesh = mesh222()
    state, sh = create_train_state(tiny_model, optax.adam(1e-3), mesh=mesh, seed=3)
    with nnx.use_eager_sharding(False):
        ref = tiny_model(nnx.Rngs(3))
    ref_params = nnx.state(ref, nnx.Param)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
        # same random draws; jit and eager may round the init scaling 1 ulp apart
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    emb = state.params["embed"]["embedding"].get_value()
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.sharding.mesh == mesh
    mu = state.opt_state[0].mu["embed"]["embedding"].get_value()
    assert mu.sharding.spec == P("tensor", "fsdp")
    assert state.step.sharding.spec == P() and state.rng.shape == (2,)
    # the abstract state is the same pytree without allocating anything
    abstract = abstract_train_state(tiny_model, optax.adam(1e-3), seed=3)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    ids = jnp.asarray([[1, 2, 3]])
    np.testing.assert_allclose(merge_model(state)(ids), ref(ids), rtol=1e-5, atol=1e-6)


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = mesh222()
    batch = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
             "ref_logps": np.linspace(-1, 0, 8, dtype=np.float32),
             "ref_sample_mask": np.ones(2, np.float32)}
    out = shard_batch(batch, mesh)
    ids = out["input_ids"]
    assert ids.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in ids.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(ids), batch["input_ids"])
    # 2 rows cannot split 4 ways: replicated rather than failing
    assert out["ref_sample_mask"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(out["ref_logps"]), batch["ref_logps"])


def test_process_helpers_single_host():
    assert parallel.process_index() == 0 and parallel.process_count() == 1
    assert parallel.is_main_process()
