"""GPT-2 only: padding, n_positions, save_hf round trip, config and parameter-name mapping.

What every decoder must do (HF logit parity, KV cache, bf16, remat) is in test_decoders.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from prefjax import parallel
from prefjax.models import gpt2 as G
from prefjax.models.hf import load_hf, save_hf
from tests.models.hf_fixtures import GPT2_VARIANTS, hf_logits, mask_positions, padded_batch


def test_padding_does_not_leak_and_positions_can_be_explicit(zoo):
    _, model = zoo("gpt2")
    ids, mask = padded_batch()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    noisy = np.where(mask == 1, ids, np.random.default_rng(5).integers(4, 100, ids.shape))
    out2 = np.asarray(model(jnp.asarray(noisy, jnp.int32), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out2[real], out[real], atol=1e-5)
    explicit = model(jnp.asarray(ids), jnp.asarray(mask), positions=mask_positions(mask))
    np.testing.assert_allclose(np.asarray(explicit)[real], out[real], atol=1e-6)


def test_positions_beyond_n_positions_are_an_error(zoo):
    _, model = zoo("gpt2")  # n_positions = 64
    with pytest.raises(ValueError, match="65 tokens.*n_positions=64"):
        model(jnp.ones((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="position 64 is beyond n_positions=64"):
        model(jnp.ones((1, 2), jnp.int32), positions=jnp.array([[63, 64]]))
    with pytest.raises(ValueError, match="max_len=65.*n_positions=64"):
        model.init_cache(1, 65)


def test_save_hf_round_trip(zoo, tmp_path):
    for name in GPT2_VARIANTS:
        _, model = zoo(name)
        out = save_hf(model, tmp_path / name)
        ids, mask = padded_batch(seed=2)
        real = mask.astype(bool)
        ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
        assert isinstance(hf, transformers.GPT2LMHeadModel)
        assert np.abs(hf_logits(hf, ids, mask) - ours)[real].max() <= 1e-4
        again, _ = load_hf(out, tokenizer=False)
        assert again.config == model.config
        for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                        jax.tree.leaves(nnx.state(again, nnx.Param)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_from_hf_and_unsupported_fields():
    d = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=32).to_dict()
    cfg = G.config_from_hf(d)
    got = (cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.head_dim)
    assert got == (64, 3, 256, 16)
    assert G.GPT2Config.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        G.config_from_hf({**d, "activation_function": "relu"})
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        G.config_from_hf({**d, "n_head": 5})


def test_parameters_carry_logical_axis_names(zoo):
    _, model = zoo("gpt2_untied_scaled")
    want = {("wte",): ("vocab", "embed"), ("wpe",): ("pos", "embed"),
            ("q", "kernel"): ("embed", "heads"), ("k", "kernel"): ("embed", "heads"),
            ("v", "kernel"): ("embed", "heads"), ("o", "kernel"): ("heads", "embed"),
            ("fc", "kernel"): ("embed", "mlp"), ("proj", "kernel"): ("mlp", "embed"),
            ("lm_head", "kernel"): ("embed", "vocab")}
    seen = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = tuple(var.get_metadata()["out_sharding"])
        if path[-1] == "scale" or (path[-1] == "bias" and "ln" in str(path[-2])):
            assert names == ("norm",), path
        elif path[-1] == "bias":
            assert names == want[(path[-2], "kernel")][1:], path
        else:
            key = (path[-1],) if path[-1] in ("wte", "wpe") else tuple(path[-2:])
            assert names == want[key], path
        seen += 1
    assert seen == 2 + 2 + 1 + 2 * (4 + 4 * 2 + 2 * 2)
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    sh = parallel.param_shardings(nnx.state(model, nnx.Param), mesh)
    q = sh["layers"][0]["attn"]["q"]["kernel"].get_value()
    assert q.spec == PartitionSpec("fsdp", "tensor")
