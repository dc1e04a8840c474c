"""Each `config.mesh.strategy` on 8 devices trains like 1 device and places what it promises.

dp keeps a full copy of parameters and optimizer state on every device; fsdp splits them over the
fsdp axis; tp splits the attention / MLP (and vocabulary) matrices over the tensor axis; fsdp_tp
and auto use both. The expected per-device bytes come from the parameter shapes alone: every
matrix shards over the axes its strategy allows, vectors (norm scales) and counters replicate.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from prefjax import losses
from prefjax.models.llama import Llama, LlamaConfig
from prefjax.parallel import DEFAULT_RULES, make_mesh
from prefjax.train.build import mesh_and_rules
from prefjax.train.state import abstract_train_state, create_train_state, state_shardings
from prefjax.train.step import build_train_step
from tests.train.tiny_model import pair_batch

CFG = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                  num_kv_heads=2, initializer_range=0.2)
OPT = optax.adamw(1e-2, weight_decay=0.1)
LOSS = losses.get("dpo", beta=0.5)
# strategy -> (mesh, mesh axes its matrices split over)
STRATEGIES = {
    "dp": ({"data": 8, "fsdp": 1, "tensor": 1}, ()),
    "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, ("fsdp",)),
    "tp": ({"data": 2, "fsdp": 1, "tensor": 4}, ("tensor",)),
    "fsdp_tp": ({"data": 1, "fsdp": 4, "tensor": 2}, ("fsdp", "tensor")),
    "auto": ({"data": 2, "fsdp": 2, "tensor": 2}, ("fsdp", "tensor")),
}
TP_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def model_fn(rngs):
    return Llama(CFG, rngs=rngs)


def train(initial, mesh, rules, steps=2):
    """`steps` DPO steps from `initial` (host arrays) placed by `rules` on `mesh`."""
    sh = state_shardings(abstract_train_state(model_fn, OPT), mesh, rules)
    state = jax.device_put(initial, sh)
    step = build_train_step(LOSS, OPT, mesh=mesh, state_shardings=sh)
    seen = []
    for i in range(steps):
        state, m = step(state, pair_batch(4, seed=i))
        seen.append(float(m["loss"]))
    return state, seen


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def initial():
    """The initial state on host, shared by every run: one init compile instead of six (that
    `create_train_state` places it as the rules say is tested in test_parallel.py)."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    state, _ = create_train_state(model_fn, OPT, mesh=mesh, seed=0)
    return jax.device_get(state)


@pytest.fixture(scope="module")
def single(initial):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    state, seen = train(initial, mesh, DEFAULT_RULES)
    return seen, leaves((state.params, state.opt_state))


def per_device_bytes(tree) -> dict:
    """Bytes of every shard each device holds (replicas counted on each device)."""
    out = collections.Counter()
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            out[s.device] += s.data.nbytes
    return out


def path_of(p) -> str:
    return jax.tree_util.keystr(p)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_trains_like_one_device_and_shards_as_promised(strategy, initial, single):
    shape, split_axes = STRATEGIES[strategy]
    mesh, rules = mesh_and_rules(ConfigDict({"mesh": {**shape, "strategy": strategy}}))
    assert dict(mesh.shape) == shape and mesh.devices.size == 8
    state, seen = train(initial, mesh, rules)

    l1, ref = single
    np.testing.assert_allclose(seen, l1, rtol=1e-5)
    for a, b in zip(leaves((state.params, state.opt_state)), ref):
        # float32 sums reduce in another order across devices: tolerance relative to the leaf
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-7, 1e-5 * np.abs(b).max()))

    tree = (state.params, state.opt_state)
    arrays = jax.tree.leaves(tree)
    total = sum(x.nbytes for x in arrays)
    matrices = sum(x.nbytes for x in arrays if x.ndim >= 2)
    assert matrices > 0.9 * total
    split = int(np.prod([shape[a] for a in split_axes]))
    held = per_device_bytes(tree)
    assert len(held) == 8
    # every device holds the same: 1/split of each matrix, all of each vector and counter
    assert set(held.values()) == {matrices // split + (total - matrices)}, (held, total)
    if strategy == "dp":
        assert set(held.values()) == {total}

    # tp's promise per weight: each attention / MLP kernel and its Adam moments split t ways
    t = shape["tensor"] if "tensor" in split_axes else 1
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_of(p)
        kernel = any(f"['{m}']['kernel']" in name for m in TP_MATRICES)
        if x.ndim >= 2:
            shard = x.addressable_shards[0].data
            assert shard.size == x.size // split, (name, shard.shape, x.shape)
            if kernel and t > 1:
                assert x.sharding.spec.count("tensor") == 1, (name, x.sharding.spec)
        else:
            assert x.addressable_shards[0].data.shape == x.shape, name  # replicated
