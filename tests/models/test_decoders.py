"""What every decoder architecture must do, checked on GPT-2 and the Llama family alike: logits
match HF PyTorch, logits are hidden states x unembed, KV-cache decoding, bf16 compute, remat.

One test per property keeps the architectures from drifting apart; what only one architecture
has (sliding window, n_positions, config and parameter-name mapping) stays in test_gpt2.py and
test_llama.py. The models come from the `zoo` fixture (conftest.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.models import gpt2 as G
from prefjax.models import llama as L
from tests.models.hf_fixtures import GPT2_VARIANTS, LLAMA_KINDS, clone, hf_logits, padded_batch

KV_HEADS = {"gpt2": 4, "llama": 4, "qwen2_tied": 2, "mistral": 2}  # head_dim is 16 in all
BF16_BOUNDS = {"gpt2": (0.3, 0.05), "llama3_rope": (0.15, 0.03)}  # (max, mean) |logit error|


def token_embedding(model) -> np.ndarray:
    """The [vocab, hidden] input embedding table, which each architecture names its own way."""
    return np.asarray((model.wte if isinstance(model, G.GPT2) else model.embed.embedding)[...])


@pytest.mark.parametrize("name", [*GPT2_VARIANTS, *LLAMA_KINDS])
def test_logits_match_hf_on_padded_batch(name, zoo):
    hf, model = zoo(name)
    assert isinstance(model, G.GPT2 if name in GPT2_VARIANTS else L.Llama)
    ids, mask = padded_batch()  # full, right-padded and two left-padded rows
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert ref[real].std() > 0.3  # logits of order 1: a 1e-4 match is not trivially small
    assert np.abs(out - ref)[real].max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied_scaled", "llama", "qwen2_tied"])
def test_logits_are_hidden_states_times_unembed(name, zoo):
    _, model = zoo(name)  # per architecture, one tied and one untied lm_head
    ids, mask = map(jnp.asarray, padded_batch())
    h, cache = model.hidden_states(ids, mask)
    assert cache is None and h.shape == (4, 16, 64)
    w = model.unembed()
    assert w.shape == (64, model.config.vocab_size)
    if model.config.tie_word_embeddings:
        np.testing.assert_array_equal(np.asarray(w), token_embedding(model).T)
    np.testing.assert_allclose(np.asarray((h @ w).astype(jnp.float32)),
                               np.asarray(model(ids, mask)), atol=1e-6)


@pytest.mark.parametrize("name", list(KV_HEADS))
@pytest.mark.parametrize("spare", [0, 3])
def test_kv_cache_decode_matches_full_forward(name, spare, zoo):
    _, model = zoo(name)
    r = np.random.default_rng(1)
    p, n = 6, 6  # prompt + decoded = 12 tokens > mistral's window of 5
    lengths = np.array([6, 4, 2])
    pmask = (np.arange(p)[None] >= p - lengths[:, None]).astype(np.int32)  # left padded
    prompt = (r.integers(4, 150, (3, p)) * pmask).astype(np.int32)
    cache = model.init_cache(3, p + n + spare)
    # one head-major buffer per layer (unrolled layers)
    assert [x.shape for x in cache.k] == [(3, KV_HEADS[name], p + n + spare, 16)] * 2
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


@pytest.mark.parametrize("name", list(BF16_BOUNDS))
def test_bf16_compute_is_close_to_float32(name, zoo):
    _, model = zoo(name)
    fast = clone(model, dtype=jnp.bfloat16)
    ids, mask = padded_batch()
    ref = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    h, _ = fast.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    out = fast(jnp.asarray(ids), jnp.asarray(mask))
    assert h.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(fast, nnx.Param)))
    err = np.abs(np.asarray(out) - ref)[mask.astype(bool)]
    max_err, mean_err = BF16_BOUNDS[name]
    assert err.max() < max_err and err.mean() < mean_err  # bf16 has ~3 significant digits
    assert {x.dtype for x in jax.tree.leaves(fast.init_cache(2, 4).k)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_remat_gives_same_logits_and_gradients(name, zoo):
    _, model = zoo(name)
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
