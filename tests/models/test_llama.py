"""Llama family only: sliding window, padding, cache overflow, config and parameter mapping, RoPE.

What every decoder must do (HF logit parity, KV cache, bf16, remat) is in test_decoders.py.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from prefjax import parallel
from prefjax.models import llama as L
from tests.models.hf_fixtures import LLAMA_KINDS, clone, make_hf_model, mask_positions, padded_batch


def test_sliding_window_changes_the_output(zoo):
    # window 5 < 16 tokens: without it late positions differ, so the HF parity test checks it
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


def test_cache_overflow_is_an_error(zoo):
    _, model = zoo("llama")
    with pytest.raises(ValueError, match="KV cache overflow.*max_len=4"):
        model(jnp.ones((1, 5), jnp.int32), cache=model.init_cache(1, 4))


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


@pytest.mark.parametrize("kind", LLAMA_KINDS)
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
