"""The jitted train step: sharded == single device, grad accumulation, no recompiles, NaN guard."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prefjax import losses
from prefjax.lm import policy_out
from prefjax.models.llama import Llama, LlamaConfig
from prefjax.parallel import make_mesh
from prefjax.train.state import create_train_state, merge_model, step_key
from prefjax.train.step import (
    build_eval_step,
    build_train_step,
    gather_process_blocks,
    merge_microbatches,
    split_microbatches,
)
from tests.train.tiny_model import VOCAB, dpo_loss, forward, pair_batch, tiny_model

LR = 0.1


def mesh1():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def mesh8():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])


def tiny_llama(rngs):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, initializer_range=0.2)
    return Llama(cfg, rngs=rngs)


def setup(mesh, opt=None, seed=0, model_fn=tiny_model, loss=dpo_loss, fwd=forward, **kw):
    opt = opt or optax.sgd(LR, momentum=0.9)
    state, sh = create_train_state(model_fn, opt, mesh=mesh, seed=seed)
    step = build_train_step(loss, opt, mesh=mesh, state_shardings=sh, forward=fwd, **kw)
    return state, sh, step


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def reference_update(state, batch, lr=LR, clip=None):
    """Plain jax.grad on the merged model and a hand-written SGD step (first step: no momentum)."""
    model = merge_model(state)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_of(p):
        return dpo_loss(forward(nnx.merge(graphdef, p), batch), batch)[0]

    loss, g = jax.value_and_grad(loss_of)(params)
    gn = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g)))
    scale = 1.0 if clip is None else min(1.0, clip / gn)
    new = jax.tree.map(lambda p, d: np.asarray(p) - lr * scale * np.asarray(d), params, g)
    return float(loss), gn, leaves(new)


def test_step_matches_plain_jax_grad_and_sgd():
    state, _, step = setup(mesh1())
    batch = pair_batch(4)
    loss, gn, expected = reference_update(state, batch)
    state, m = step(state, batch)
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), gn, rtol=1e-5)
    for a, b in zip(leaves(state.params), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(state.step) == 1 and float(m["nonfinite"]) == 0.0
    assert "rewards/margins" in m


def test_max_grad_norm_clips_after_reporting():
    state, _, step = setup(mesh1(), max_grad_norm=1e-3)
    batch = pair_batch(4)
    _, gn, expected = reference_update(state, batch, clip=1e-3)
    assert gn > 1e-2  # the clip is active
    state, m = step(state, batch)
    np.testing.assert_allclose(float(m["grad_norm"]), gn, rtol=1e-5)
    for a, b in zip(leaves(state.params), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("real,k", [(False, 1), (True, 2)])
def test_sharded_8_devices_equals_single_device(real, k):
    """real: tiny Llama, the default forward (prefjax.lm.policy_out) and losses.get('dpo')."""
    kw = dict(model_fn=tiny_llama, fwd=None, loss=losses.get("dpo", beta=0.5)) if real else {}
    results = []
    for mesh in (mesh1(), mesh8()):
        state, _, step = setup(mesh, grad_accum=k, **kw)
        seen = []
        for i in range(2):
            state, m = step(state, pair_batch(4, seed=i))
            seen.append(float(m["loss"]))
        results.append((seen, leaves(state.params), leaves(state.opt_state)))
    (l1, p1, o1), (l8, p8, o8) = results
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    for a, b in zip(p1 + o1, p8 + o8):
        # float32 sums reduce in another order across devices: tolerance relative to the leaf
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-7, 1e-5 * np.abs(b).max()))


def test_sharded_state_is_really_sharded():
    state, _, step = setup(mesh8())
    state, _ = step(state, pair_batch(4))
    kernel = state.params["up"]["kernel"][...]  # ('embed', 'mlp') -> ('fsdp', 'tensor')
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (4, 8)
    momentum = state.opt_state[0].trace["up"]["kernel"][...]
    assert momentum.sharding.spec == kernel.sharding.spec


def test_split_microbatches_keeps_pairs_together():
    b = {"x": np.arange(8), "y": np.arange(8) * 10}
    mb = split_microbatches(b, 2)
    # pairs (i, i + 4): micro-batch 0 = chosen 0,1 + rejected 4,5
    np.testing.assert_array_equal(mb["x"], [[0, 1, 4, 5], [2, 3, 6, 7]])
    np.testing.assert_array_equal(mb["y"], 10 * np.asarray([[0, 1, 4, 5], [2, 3, 6, 7]]))
    flat = split_microbatches(b, 2, paired=False)
    np.testing.assert_array_equal(flat["x"], [[0, 1, 2, 3], [4, 5, 6, 7]])
    # MPO: 4 pairs then 2 reference rows with their own mask (a tail group the record names)
    mpo = {"x": np.arange(10), "ref_sample_mask": np.asarray([1.0, 0.0])}
    mb = split_microbatches(mpo, 2, tail_key="ref_sample_mask")
    np.testing.assert_array_equal(mb["x"], [[0, 1, 4, 5, 8], [2, 3, 6, 7, 9]])
    np.testing.assert_array_equal(mb["ref_sample_mask"], [[1.0], [0.0]])
    with pytest.raises(ValueError, match="grad_accum=3"):
        split_microbatches(b, 3)  # 4 chosen rows do not split 3 ways
    with pytest.raises(ValueError, match="rows"):
        split_microbatches({"x": np.arange(8), "y": np.arange(6)}, 2)


@pytest.mark.parametrize("mesh_fn,real", [
    (mesh1, False), (mesh8, False), pytest.param(mesh8, True, marks=pytest.mark.slow)])
def test_grad_accum_equals_full_batch(mesh_fn, real):
    """k=2 micro-batches of 4 pairs == one batch of 8 pairs (real: Llama, lm, losses.get)."""
    kw = dict(model_fn=tiny_llama, fwd=None, loss=losses.get("dpo", beta=0.5)) if real else {}
    batch = pair_batch(8, seed=3)
    out = []
    for k in (1, 2):
        state, _, step = setup(mesh_fn(), grad_accum=k, **kw)
        state, m = step(state, batch)
        out.append(({key: float(v) for key, v in m.items()}, leaves(state.params)))
    (m1, p1), (m2, p2) = out
    assert m1.keys() == m2.keys() and "rewards/margins" in m1
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-7, 1e-5 * np.abs(b).max()))


def _live_ref_forward(model, batch):
    """A forward that also returns batch keys (as a live reference does): ref_logps [b]."""
    out = forward(model, batch)
    return out, {"ref_logps": out.logps - 1.0 - batch["loss_mask"].sum(-1)}


def test_grad_accum_with_forward_additions_equals_full_batch():
    """Additions computed per micro-batch are reassembled in the batch's row order (and
    detached) before the loss sees them: k=2 == one batch."""
    batch = pair_batch(8, seed=5)
    out = []
    for k in (1, 2):
        state, _, step = setup(mesh1(), opt=optax.sgd(LR), grad_accum=k, fwd=_live_ref_forward)
        state, m = step(state, batch)
        out.append(({key: float(v) for key, v in m.items()}, leaves(state.params)))
    (m1, p1), (m2, p2) = out
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-7, 1e-5 * np.abs(b).max()))


def test_grad_accum_rejects_outputs_without_one_entry_per_row():
    def scalar_addition(model, batch):
        return forward(model, batch), {"ref_total": jnp.zeros(())}

    state, _, step = setup(mesh1(), grad_accum=2, fwd=scalar_addition)
    with pytest.raises(ValueError, match="one entry per batch row.*ref_total"):
        step(state, pair_batch(4))


def test_compiles_once_for_same_shapes():
    traces = []

    def counting_forward(model, batch):
        traces.append(1)
        return forward(model, batch)

    mesh = mesh8()
    opt = optax.sgd(LR)
    state, sh = create_train_state(tiny_model, opt, mesh=mesh)
    step = build_train_step(dpo_loss, opt, mesh=mesh, state_shardings=sh,
                            forward=counting_forward)
    for i in range(3):
        state, _ = step(state, pair_batch(4, seed=i))
    assert len(traces) == 1
    assert int(state.step) == 3


def test_nonfinite_loss_skips_update():
    state, _, step = setup(mesh1())
    state, _ = step(state, pair_batch(4, seed=0))
    before = leaves((state.params, state.opt_state)) + [int(state.step)]
    bad = pair_batch(4, seed=1)
    bad["ref_logps"][0] = np.nan
    state, m = step(state, bad)
    assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
    after = leaves((state.params, state.opt_state)) + [int(state.step)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, pair_batch(4, seed=2))  # training continues from the good state
    assert float(m["nonfinite"]) == 0.0 and int(state.step) == 2


def test_learning_rate_metric_from_inject_hyperparams():
    sched = optax.linear_schedule(0.0, 1.0, 4)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=sched)
    state, _, step = setup(mesh1(), opt=opt)
    lrs = []
    for i in range(3):
        state, m = step(state, pair_batch(4, seed=i))
        lrs.append(float(m["learning_rate"]))
    np.testing.assert_allclose(lrs, [sched(0), sched(1), sched(2)], rtol=1e-6)


def test_eval_step_matches_train_loss_and_leaves_state():
    state, sh, step = setup(mesh8())
    evaluate = build_eval_step(dpo_loss, mesh=mesh8(), state_shardings=sh, forward=forward)
    batch = pair_batch(4)
    m_eval = evaluate(state, batch)
    state, m = step(state, batch)
    np.testing.assert_allclose(float(m_eval["loss"]), float(m["loss"]), rtol=1e-6)


def test_frozen_embedding_gets_no_update():
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))
    mesh = mesh8()
    opt = optax.sgd(LR)
    state, sh = create_train_state(tiny_model, opt, mesh=mesh, trainable=trainable)
    assert "embed" not in state.params and "embed" in state.rest
    emb = np.asarray(state.rest["embed"]["embedding"].get_value())
    up = np.asarray(state.params["up"]["kernel"].get_value())
    step = build_train_step(dpo_loss, opt, mesh=mesh, state_shardings=sh, forward=forward)
    state, _ = step(state, pair_batch(4))
    np.testing.assert_array_equal(np.asarray(state.rest["embed"]["embedding"].get_value()), emb)
    assert not np.allclose(np.asarray(state.params["up"]["kernel"].get_value()), up)


def test_merge_inverts_split():
    mpo = {"x": np.arange(20).reshape(10, 2), "ref_sample_mask": np.asarray([1.0, 0.0])}
    for paired in (True, False):
        split = split_microbatches(mpo, 2, paired=paired, tail_key="ref_sample_mask")
        back = merge_microbatches(split, paired=paired, tail_key="ref_sample_mask")
        for key in mpo:
            np.testing.assert_array_equal(back[key], mpo[key])


def test_multi_process_layout_is_regrouped_into_pairs():
    """Two hosts each load [chosen, rejected] of their pairs: the global array interleaves them."""
    batch = pair_batch(4, seed=4)  # pairs (i, i + 4)
    host_order = [0, 1, 4, 5, 2, 3, 6, 7]  # host 0: pairs 0,1; host 1: pairs 2,3
    hosts = {k: v[host_order] for k, v in batch.items()}
    np.testing.assert_array_equal(gather_process_blocks(hosts, 2)["input_ids"],
                                  batch["input_ids"])
    out = []
    for b, blocks in ((batch, 1), (hosts, 2)):
        state, _, step = setup(mesh1(), process_blocks=blocks)
        state, m = step(state, b)
        out.append((float(m["loss"]), leaves(state.params)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_step_key_depends_only_on_rng_and_step():
    state, _, step = setup(mesh1())
    k0 = jax.random.key_data(step_key(state))
    state, _ = step(state, pair_batch(4))
    k1 = jax.random.key_data(step_key(state))
    assert not np.array_equal(k0, k1)
    np.testing.assert_array_equal(k1, jax.random.key_data(step_key(state.replace(step=state.step))))


def test_default_forward_is_lm_policy_out_and_matches_reference_forward():
    """prefjax.lm.policy_out (vocab-chunked or not) trains exactly like the test forward."""
    batch = pair_batch(4, seed=7)
    out = []
    for fwd in (forward, functools.partial(policy_out, chunk_size=6)):  # None: sharded test
        state, _, step = setup(mesh1(), model_fn=tiny_llama, fwd=fwd)
        state, m = step(state, batch)
        out.append((float(m["loss"]), leaves(state.params)))
    for loss, params in out[1:]:
        np.testing.assert_allclose(loss, out[0][0], rtol=1e-5)
        for a, b in zip(params, out[0][1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
