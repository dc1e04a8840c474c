"""Llama-family decoder against HF PyTorch: logits, KV-cache decoding, padding, bf16, remat."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from prefjax import parallel
from prefjax.models import llama as L
from tests.models.hf_fixtures import hf_logits, make_hf_model, mask_positions, padded_batch

KINDS = ("llama", "llama3_rope", "qwen2", "qwen2_tied", "mistral")


def from_torch(hf, **kw) -> L.Llama:
    """A prefjax Llama holding the torch model's weights (via the HF hooks, no files)."""
    cfg = L.config_from_hf(hf.config.to_dict())
    model = L.Llama(cfg, rngs=nnx.Rngs(0), **kw)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    copy_params(model, L.params_from_hf(tensors, cfg))
    return model


def copy_params(model: nnx.Module, pure: dict) -> None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)


def clone(model: L.Llama, **kw) -> L.Llama:
    """Same weights, other construction options (dtype, remat, config fields)."""
    cfg = dataclasses.replace(model.config, **kw.pop("config", {}))
    other = L.Llama(cfg, rngs=nnx.Rngs(1), **kw)
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


@pytest.fixture(scope="module")
def zoo():
    made = {}

    def get(kind):
        if kind not in made:
            hf = make_hf_model(kind)
            made[kind] = (hf, from_torch(hf))
        return made[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_on_padded_batch(kind, zoo):
    hf, model = zoo(kind)
    ids, mask = padded_batch()
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert ref[real].std() > 0.3  # logits of order 1: a 1e-4 match is not trivially small
    assert np.abs(out - ref)[real].max() <= 1e-4


def test_sliding_window_changes_the_output(zoo):
    # window 5 < 16 tokens: without it late positions differ, so the parity test above checks it
    _, model = zoo("mistral")
    ids, mask = padded_batch()
    full = clone(model, config={"sliding_window": None})
    a, b = model(jnp.asarray(ids), jnp.asarray(mask)), full(jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(a - b))[0, :5].max() < 1e-5  # inside the window: identical
    assert np.abs(np.asarray(a - b))[0, 8:].max() > 1e-2


def test_padding_does_not_leak_and_empty_rows_are_finite(zoo):
    _, model = zoo("qwen2")
    ids, mask = padded_batch()
    mask[3] = 0  # a fully padded row
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(out).all()
    noisy = np.where(mask == 1, ids, np.random.default_rng(5).integers(4, 100, ids.shape))
    out2 = np.asarray(model(jnp.asarray(noisy, jnp.int32), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out2[real], out[real], atol=1e-5)
    explicit = model(jnp.asarray(ids), jnp.asarray(mask), positions=mask_positions(mask))
    np.testing.assert_allclose(np.asarray(explicit)[real], out[real], atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied", "mistral"])
@pytest.mark.parametrize("spare", [0, 3])
def test_kv_cache_decode_matches_full_forward(kind, spare, zoo):
    _, model = zoo(kind)
    r = np.random.default_rng(1)
    p, n = 6, 6  # prompt + decoded = 12 tokens > mistral's window of 5
    lengths = np.array([6, 4, 2])
    pmask = (np.arange(p)[None] >= p - lengths[:, None]).astype(np.int32)  # left padded
    prompt = (r.integers(4, 150, (3, p)) * pmask).astype(np.int32)
    cache = model.init_cache(3, p + n + spare)
    assert cache.k.shape == (2, 3, p + n + spare, model.config.num_kv_heads, model.config.head_dim)
    logits, cache = model(jnp.asarray(prompt), jnp.asarray(pmask), cache=cache)
    full = model(jnp.asarray(prompt), jnp.asarray(pmask))
    real = pmask.astype(bool)
    assert np.abs(np.asarray(logits - full))[real].max() <= 1e-4

    step = nnx.jit(lambda m, tok, c: m(tok, cache=c))
    toks, steps = [], []
    for _ in range(n):
        toks.append(jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32))
        logits, cache = step(model, toks[-1], cache)
        steps.append(logits[:, 0])
    # causal: the full forward of the final sequence at position j sees exactly tokens <= j
    seq = np.concatenate([prompt, *map(np.asarray, toks)], axis=1)
    smask = np.concatenate([pmask, np.ones((3, n), np.int32)], axis=1)
    ref = model(jnp.asarray(seq), jnp.asarray(smask))[:, p:]
    assert np.abs(np.asarray(jnp.stack(steps, axis=1) - ref)).max() <= 1e-4
    assert int(cache.index) == p + n
    np.testing.assert_array_equal(np.asarray(cache.mask), np.pad(smask, ((0, 0), (0, spare))))


def test_cache_overflow_is_an_error(zoo):
    _, model = zoo("llama")
    with pytest.raises(ValueError, match="KV cache overflow.*max_len=4"):
        model(jnp.ones((1, 5), jnp.int32), cache=model.init_cache(1, 4))


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied"])
def test_logits_are_hidden_states_times_unembed(kind, zoo):
    _, model = zoo(kind)
    ids, mask = padded_batch()
    h, cache = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    assert cache is None and h.shape == (4, 16, 64)
    w = model.unembed()
    assert w.shape == (64, model.config.vocab_size)
    if model.config.tie_word_embeddings:
        np.testing.assert_array_equal(np.asarray(w), np.asarray(model.embed.embedding[...]).T)
    np.testing.assert_allclose(np.asarray((h @ w).astype(jnp.float32)),
                               np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)


def test_bf16_compute_is_close_to_float32(zoo):
    _, model = zoo("llama3_rope")
    fast = clone(model, dtype=jnp.bfloat16)
    ids, mask = padded_batch()
    ref = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    h, _ = fast.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    out = fast(jnp.asarray(ids), jnp.asarray(mask))
    assert h.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(fast, nnx.Param)))
    err = np.abs(np.asarray(out) - ref)[mask.astype(bool)]
    assert err.max() < 0.15 and err.mean() < 0.03  # bf16 has ~3 significant digits
    assert fast.init_cache(2, 4).k.dtype == jnp.bfloat16


def test_remat_gives_same_logits_and_gradients(zoo):
    _, model = zoo("qwen2")
    remat = clone(model, remat=True)
    ids, mask = padded_batch()
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(m):
        logp = jax.nn.log_softmax(m(ids, mask)[:, :-1])
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -(tok * mask[:, 1:]).sum() / mask[:, 1:].sum()

    vg = nnx.jit(nnx.value_and_grad(loss))
    (l1, g1), (l2, g2) = vg(model), vg(remat)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 1e-3


def test_parameters_carry_logical_axis_names(zoo):
    _, model = zoo("qwen2")
    want = {("embed", "embedding"): ("vocab", "embed"), ("q", "kernel"): ("embed", "heads"),
            ("k", "kernel"): ("embed", "kv_heads"), ("v", "kernel"): ("embed", "kv_heads"),
            ("q", "bias"): ("heads",), ("k", "bias"): ("kv_heads",), ("v", "bias"): ("kv_heads",),
            ("o", "kernel"): ("heads", "embed"), ("gate", "kernel"): ("embed", "mlp"),
            ("up", "kernel"): ("embed", "mlp"), ("down", "kernel"): ("mlp", "embed"),
            ("lm_head", "kernel"): ("embed", "vocab")}
    seen = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        expect = ("norm",) if path[-1] == "scale" else want[tuple(path[-2:])]
        assert tuple(names) == expect, path
        seen += 1
    assert seen == 3 + 2 * (2 + 3 * 2 + 1 + 3)
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    sh = parallel.param_shardings(nnx.state(model, nnx.Param), mesh)
    q = sh["layers"][0]["attn"]["q"]["kernel"].get_value()
    assert q.spec == PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_through_hf_dict(kind):
    cfg = L.config_from_hf(make_hf_model(kind).config.to_dict())
    assert L.LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.head_dim == 16 and cfg.model_type == make_hf_model(kind).config.model_type


def test_config_reads_hf_fields():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4)
    old_style = L.LlamaConfig.from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                                       "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                                        "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192},
                                       "attention_bias": True})
    assert (old_style.rope_theta, old_style.rope_type, old_style.rope_factor) == (5e5, "llama3", 32)
    assert old_style.num_kv_heads == 4 and old_style.qkv_bias and old_style.o_bias
    qwen = L.LlamaConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": False,
                                  "sliding_window": 4096})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        L.LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        L.LlamaConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="mistral has no biases"):
        qwen.to_hf("mistral")


def test_llama3_rope_frequencies_match_hf():
    import torch  # noqa: F401  (HF's rope helpers return torch tensors)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = make_hf_model("llama3_rope")
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    ours = L.rope_inv_freq(L.config_from_hf(hf.config.to_dict()))
    assert scale == 1.0
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert not np.allclose(ours, L.rope_inv_freq(dataclasses.replace(
        L.config_from_hf(hf.config.to_dict()), rope_type="default")))
