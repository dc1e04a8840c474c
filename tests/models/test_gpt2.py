"""GPT-2 decoder against HF PyTorch: logits via load_hf, KV-cache decoding, save_hf round trip."""

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
from tests.models.hf_fixtures import hf_logits, make_tiny_checkpoint, mask_positions, padded_batch

VARIANTS = {"default": {}, "untied_scaled": dict(tie_word_embeddings=False,
                                                scale_attn_by_inverse_layer_idx=True, n_inner=96)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    made = {}

    def get(variant="default"):
        if variant not in made:
            path = tmp_path_factory.mktemp(f"gpt2_{variant}")
            make_tiny_checkpoint("gpt2", path, **VARIANTS[variant])
            made[variant] = (path, load_hf(path, tokenizer=False)[0])
        return made[variant]

    return get


def clone(model: G.GPT2, **kw) -> G.GPT2:
    """Same weights, other construction options."""
    other = G.GPT2(model.config, rngs=nnx.Rngs(1), **kw)
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_on_padded_batch(variant, ckpt):
    path, model = ckpt(variant)
    assert isinstance(model, G.GPT2)
    ids, mask = padded_batch()  # full, right-padded and two left-padded rows
    ref = hf_logits(path, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert ref[real].std() > 0.3  # logits of order 1: a 1e-4 match is not trivially small
    assert np.abs(out - ref)[real].max() <= 1e-4


def test_padding_does_not_leak_and_positions_can_be_explicit(ckpt):
    _, model = ckpt()
    ids, mask = padded_batch()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    noisy = np.where(mask == 1, ids, np.random.default_rng(5).integers(4, 100, ids.shape))
    out2 = np.asarray(model(jnp.asarray(noisy, jnp.int32), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out2[real], out[real], atol=1e-5)
    explicit = model(jnp.asarray(ids), jnp.asarray(mask), positions=mask_positions(mask))
    np.testing.assert_allclose(np.asarray(explicit)[real], out[real], atol=1e-6)


def test_logits_are_hidden_states_times_unembed(ckpt):
    for variant in VARIANTS:
        _, model = ckpt(variant)
        ids, mask = map(jnp.asarray, padded_batch())
        h, cache = model.hidden_states(ids, mask)
        w = model.unembed()
        assert cache is None and h.shape == (4, 16, 64) and w.shape == (64, 160)
        if model.config.tie_word_embeddings:
            np.testing.assert_array_equal(np.asarray(w), np.asarray(model.wte[...]).T)
        np.testing.assert_allclose(np.asarray(h @ w), np.asarray(model(ids, mask)), atol=1e-6)


@pytest.mark.parametrize("spare", [0, 3])
def test_kv_cache_decode_matches_full_forward(spare, ckpt):
    _, model = ckpt()
    r = np.random.default_rng(1)
    p, n = 6, 5
    lengths = np.array([6, 4, 2])
    pmask = (np.arange(p)[None] >= p - lengths[:, None]).astype(np.int32)  # left padded
    prompt = (r.integers(4, 150, (3, p)) * pmask).astype(np.int32)
    cache = model.init_cache(3, p + n + spare)
    assert cache.k.shape == (2, 3, p + n + spare, 4, 16)
    logits, cache = model(jnp.asarray(prompt), jnp.asarray(pmask), cache=cache)
    full = model(jnp.asarray(prompt), jnp.asarray(pmask))
    assert np.abs(np.asarray(logits - full))[pmask.astype(bool)].max() <= 1e-4

    step = nnx.jit(lambda m, tok, c: m(tok, cache=c))
    toks, steps = [], []
    for _ in range(n):
        toks.append(jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32))
        logits, cache = step(model, toks[-1], cache)
        steps.append(logits[:, 0])
    seq = np.concatenate([prompt, *map(np.asarray, toks)], axis=1)
    smask = np.concatenate([pmask, np.ones((3, n), np.int32)], axis=1)
    ref = model(jnp.asarray(seq), jnp.asarray(smask))[:, p:]
    assert np.abs(np.asarray(jnp.stack(steps, axis=1) - ref)).max() <= 1e-4
    assert int(cache.index) == p + n


def test_positions_beyond_n_positions_are_an_error(ckpt):
    _, model = ckpt()  # n_positions = 64
    with pytest.raises(ValueError, match="65 tokens.*n_positions=64"):
        model(jnp.ones((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="position 64 is beyond n_positions=64"):
        model(jnp.ones((1, 2), jnp.int32), positions=jnp.array([[63, 64]]))
    with pytest.raises(ValueError, match="max_len=65.*n_positions=64"):
        model.init_cache(1, 65)


def test_save_hf_round_trip(ckpt, tmp_path):
    for variant in VARIANTS:
        _, model = ckpt(variant)
        out = save_hf(model, tmp_path / variant)
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


def test_bf16_compute_and_remat(ckpt):
    _, model = ckpt()
    ids, mask = map(jnp.asarray, padded_batch())
    ref = np.asarray(model(ids, mask))
    fast = clone(model, dtype=jnp.bfloat16)
    h, _ = fast.hidden_states(ids, mask)
    out = fast(ids, mask)
    assert h.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref)[np.asarray(mask).astype(bool)]
    assert err.max() < 0.3 and err.mean() < 0.05  # bf16 keeps ~3 significant digits

    def loss(m):
        logp = jax.nn.log_softmax(m(ids, mask)[:, :-1])
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    vg = nnx.jit(nnx.value_and_grad(loss))
    (l1, g1), (l2, g2) = vg(model), vg(clone(model, remat=True))
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


def test_parameters_carry_logical_axis_names(ckpt):
    _, model = ckpt("untied_scaled")
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
