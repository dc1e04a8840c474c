"""Packed rows (segment ids): attention never crosses segments, in every implementation, and a
packed decoder forward equals each sequence's own forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.models import attention
from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.llama import Llama, LlamaConfig
from tests.models.test_attention_impls import (
    _inputs,
    _value_and_grads,
    allowed_np,
    assert_matches_reference,
)


def segments_np(lengths, s):
    """int32 [s]: segment i + 1 on the i-th run of `lengths`, 0 on the padding after them."""
    seg = np.zeros(s, np.int32)
    at = 0
    for i, n in enumerate(lengths):
        seg[at:at + n] = i + 1
        at += n
    return seg


def packed_allowed(key_mask, seg, q_start, t, window):
    """Causal visibility (explicit loops) and the same segment, by explicit comparison."""
    a = allowed_np(key_mask, q_start, t, window)
    same = seg[:, q_start:q_start + t, None] == seg[:, None, :]
    return a & same


# (b, t, h, kh, d, row lengths, window, block_q, block_k)
PACKED = {
    "three_segments": (2, 13, 2, 2, 8, ([4, 5, 3], [7, 6]), None, 4, 3),
    "gqa_window": (2, 13, 4, 2, 8, ([5, 8], [2, 3, 4]), 3, 5, 4),
    "one_block": (2, 9, 2, 1, 8, ([3, 3, 3], [9]), None, 128, 256),
}


def _packed_case(name):
    b, t, h, kh, d, lengths, window, bq, bk = PACKED[name]
    seg = np.stack([segments_np(r, t) for r in lengths])
    key_mask = (seg != 0).astype(np.int32)
    return b, t, h, kh, d, key_mask, seg, window, bq, bk


@pytest.mark.parametrize("case", PACKED)
@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_segments_match_reference(impl, case):
    """Output and q/k/v gradients equal float64 NumPy / plain autodiff with the segment mask
    (padding rows with no visible key included)."""
    b, t, h, kh, d, key_mask, seg, window, bq, bk = _packed_case(case)
    q, k, v, w = _inputs(b, t, t, h, kh, d)
    fn = lambda q, k, v: attention.attend(  # noqa: E731
        q, k, v, key_mask=jnp.asarray(key_mask), q_start=0, window=window, scale=d ** -0.5,
        impl=impl, block_q=bq, block_k=bk, segment_ids=jnp.asarray(seg))
    out, got = _value_and_grads(fn, w, q, k, v)
    assert_matches_reference(out, got, w, q, k, v, packed_allowed(key_mask, seg, 0, t, window))


def test_cudnn_wrapper_segments_through_xla():
    """The cuDNN path's segment mask and no-visible-key patch (XLA standing in for cuDNN)."""
    b, t, h, kh, d, key_mask, seg, window, *_ = _packed_case("gqa_window")
    q, k, v, w = _inputs(b, t, t, h, kh, d)
    with attention.compiling_for("gpu"):
        out, got = _value_and_grads(
            lambda q, k, v: attention._cudnn(q, k, v, jnp.asarray(key_mask), 0, window,
                                             d ** -0.5, implementation="xla",
                                             segment_ids=jnp.asarray(seg)), w, q, k, v)
    assert_matches_reference(out, got, w, q, k, v, packed_allowed(key_mask, seg, 0, t, window))


def test_splash_segments_interpreted_on_cpu():
    """Splash's Pallas kernels with packed segment ids, in interpret mode (CPU)."""
    t = 128
    seg = np.stack([segments_np([40, 50, 20], t), segments_np([100, 28], t)])
    key_mask = (seg != 0).astype(np.int32)
    q, k, v, w = _inputs(2, t, t, 2, 1, 128)
    with attention.compiling_for("tpu"):
        out, got = _value_and_grads(
            lambda q, k, v: attention._splash(q, k, v, jnp.asarray(key_mask), 0, None,
                                              128 ** -0.5, interpret=True,
                                              segment_ids=jnp.asarray(seg)), w, q, k, v)
    assert_matches_reference(out, got, w, q, k, v, packed_allowed(key_mask, seg, 0, t, None))


def test_splash_segments_compile_for_a_tpu_topology(monkeypatch):
    """AOT-compile splash with segment ids, forward and backward, for v5e (no TPU here)."""
    import libtpu  # noqa: F401

    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
    b, t, h, kh, d = 4, 256, 4, 2, 128

    def loss(q, k, v, seg):
        o = attention.attend(q, k, v, key_mask=(seg != 0).astype(jnp.int32), q_start=0,
                             scale=d ** -0.5, impl="splash", segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32))

    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x, kv, seg = (jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for shape, dtype in (
        ((b, t, h, d), jnp.bfloat16), ((b, t, kh, d), jnp.bfloat16), ((b, t), jnp.int32)))
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    with jax.set_mesh(mesh), attention.compiling_for("tpu"):
        lowered = step.lower(x, kv, kv, seg)
    assert "tpu_custom_call" in lowered.as_text()
    lowered.compile()


def test_segment_positions_and_dead_rows():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(attention.segment_positions(seg),
                                  [[0, 1, 0, 1, 2, 0, 1], list(range(7))])
    mask = (seg != 0).astype(jnp.int32)
    np.testing.assert_array_equal(attention.no_visible_key(mask, 0, 7, None, seg),
                                  [[0, 0, 0, 0, 0, 1, 1], [0] * 7])


def test_bad_segment_ids_fail_with_names():
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="segment_ids must be"):
        attention.attend(q, k, v, key_mask=jnp.ones((1, 4)), q_start=0, scale=1.0,
                         segment_ids=jnp.ones((1, 3), jnp.int32))


# ---- decoders: a packed forward equals each sequence's own forward -------------------------


def _llama(impl, **kw):
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, attention_impl=impl, **kw)
    return Llama(cfg, rngs=nnx.Rngs(0))


def _gpt2(impl, **kw):
    cfg = GPT2Config(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                     max_position_embeddings=32, attention_impl=impl, **kw)
    return GPT2(cfg, rngs=nnx.Rngs(0))


MODELS = {"llama": _llama, "llama_scan": functools.partial(_llama, scan_layers=True),
          "mistral_window": functools.partial(_llama, sliding_window=3),
          "gpt2": _gpt2}
LENGTHS = ([5, 7, 4], [9, 6])  # two packed rows of 18 slots (row 1 ends in padding)
T = 18


def _packed_rows(seed=0):
    rng = np.random.default_rng(seed)
    seqs = [[rng.integers(1, 61, n) for n in row] for row in LENGTHS]
    ids = np.zeros((len(LENGTHS), T), np.int32)
    for r, row in enumerate(seqs):
        ids[r, :sum(LENGTHS[r])] = np.concatenate(row)
    seg = np.stack([segments_np(row, T) for row in LENGTHS])
    return seqs, ids, seg


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_forward_equals_each_sequence_alone(name, impl):
    model = MODELS[name](impl)
    seqs, ids, seg = _packed_rows()
    logits = model(jnp.asarray(ids), segment_ids=jnp.asarray(seg))
    for r, row in enumerate(seqs):
        at = 0
        for x in row:
            alone = model(jnp.asarray(x)[None])[0]
            np.testing.assert_allclose(logits[r, at:at + len(x)], alone, rtol=1e-5, atol=1e-5)
            at += len(x)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_changing_one_segment_leaves_the_others_untouched(name, impl):
    """Bitwise: no information flows between segments, before or after the changed one."""
    model = MODELS[name](impl)
    _, ids, seg = _packed_rows()
    changed = ids.copy()
    changed[0, 5:12] = (changed[0, 5:12] + 7) % 61  # all of row 0's segment 2
    f = jax.jit(lambda x: model(x, segment_ids=jnp.asarray(seg)))
    a, b = np.asarray(f(jnp.asarray(ids))), np.asarray(f(jnp.asarray(changed)))
    others = (seg != 2) | (np.arange(2)[:, None] == 1)
    others &= seg != 0
    np.testing.assert_array_equal(a[others], b[others])
    assert np.abs(a[0, 5:12] - b[0, 5:12]).max() > 1e-3  # the changed segment did change


def test_segment_ids_with_a_cache_fail():
    model = _llama("xla")
    with pytest.raises(ValueError, match="KV cache"):
        model(jnp.ones((1, 4), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32),
              cache=model.init_cache(1, 8))
