"""prefjax.lm against float64 NumPy: token/sequence log-probs, chunked log-softmax, PolicyOut."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax import lm
from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.heads import PolicyWithValue, RewardModel
from prefjax.models.llama import Llama, LlamaConfig

V = 160  # not a multiple of CHUNK: the last vocabulary block is partly masked
CHUNK = 48


def tiny(kind: str):
    # initializer_range well above HF's 0.02 so that logits are O(1), not near-uniform
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                         max_position_embeddings=64, initializer_range=0.3)
        return GPT2(cfg, rngs=nnx.Rngs(0))
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, initializer_range=0.3)
    return Llama(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny(request.param)


def batch(seed=0, b=4, t=12):
    """ids, attention_mask, loss_mask [b, t]: full, right-padded, left-padded, short rows."""
    r = np.random.default_rng(seed)
    ids = r.integers(1, V, (b, t))
    mask = np.zeros((b, t), np.int32)
    mask[0] = 1
    mask[1, : t - 4] = 1
    mask[2, 3:] = 1
    mask[3, t - 5:] = 1
    loss = mask.copy()
    loss[:, :] *= (np.arange(t) >= 2)[None]  # a prompt of at least 2 tokens is never scored
    loss[2, :6] = 0
    loss[3, : t - 3] = 0
    return jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask), jnp.asarray(loss)


def np_token_logps(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 reference with the lm alignment (column t scored only if t-1 and t are real)."""
    z = logits.astype(np.float64)[:, :-1]
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    lp = np.take_along_axis(z, ids[:, 1:, None], -1)[..., 0] - lse
    lp = lp * (mask[:, 1:] * mask[:, :-1])
    return np.pad(lp, ((0, 0), (1, 0)))


@pytest.mark.parametrize("chunk", [None, CHUNK, V, 7])
def test_token_logps_match_float64_log_softmax(model, chunk):
    ids, mask, _ = batch()
    ref = np_token_logps(np.asarray(model(ids, mask)), np.asarray(ids), np.asarray(mask))
    got = np.asarray(lm.token_logps(model, ids, mask, chunk_size=chunk))
    assert got.dtype == np.float32 and got.shape == ids.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.abs(ref).max() > 1.0  # logits are not near-uniform, so the test has teeth


def np_chunk_reference(h, w, targets, g_lse, g_tgt):
    """Closed forms in float64: lse, target logit, and d(g_lse.lse + g_tgt.tgt)/d(h, w)."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    z = h @ w
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    tgt = z[np.arange(len(targets)), targets]
    dz = g_lse[:, None] * np.exp(z - lse[:, None])
    dz[np.arange(len(targets)), targets] += g_tgt
    return lse, tgt, dz @ w.T, h.T @ dz


@pytest.mark.parametrize("chunk", [16, 48, 160, 500])
def test_chunked_logsumexp_and_target_values_and_closed_form_grads(chunk):
    r = np.random.default_rng(1)
    n, d = 10, 8
    h = r.normal(size=(n, d)).astype(np.float32)
    w = r.normal(size=(d, V)).astype(np.float32)
    tg = r.integers(0, V, n)
    g1, g2 = r.normal(size=n), r.normal(size=n)

    def f(h, w):
        lse, tgt = lm.chunked_logsumexp_and_target(h, w, jnp.asarray(tg), chunk)
        return jnp.sum(lse * g1.astype(np.float32)) + jnp.sum(tgt * g2.astype(np.float32))

    lse, tgt = lm.chunked_logsumexp_and_target(jnp.asarray(h), jnp.asarray(w), jnp.asarray(tg),
                                               chunk)
    dh, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(w))
    r_lse, r_tgt, r_dh, r_dw = np_chunk_reference(h, w, tg, g1, g2)
    np.testing.assert_allclose(lse, r_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tgt, r_tgt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, r_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, r_dw, rtol=1e-4, atol=1e-5)


def test_target_logps_values_and_closed_form_grads():
    """The unchunked path's hand-written VJP against the float64 closed form."""
    r = np.random.default_rng(2)
    n, d = 12, 8
    h = r.normal(size=(n, d)).astype(np.float32)
    w = r.normal(size=(d, V)).astype(np.float32)
    tg = r.integers(0, V, n)
    g = r.normal(size=n)

    def f(h, w):
        return jnp.sum(lm.target_logps(h, w, jnp.asarray(tg)) * g.astype(np.float32))

    lp = lm.target_logps(jnp.asarray(h), jnp.asarray(w), jnp.asarray(tg))
    dh, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(w))
    r_lse, r_tgt, r_dh, r_dw = np_chunk_reference(h, w, tg, -g, g)
    np.testing.assert_allclose(lp, r_tgt - r_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, r_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, r_dw, rtol=1e-4, atol=1e-5)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        lm.chunked_logsumexp_and_target(jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.zeros(2, int), 0)


def _grads(model, chunk):
    ids, mask, loss = batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.sum(lm.sequence_logps(m, ids, mask, loss, chunk_size=chunk))

    return jax.jit(jax.value_and_grad(f))(params)


def test_chunked_equals_unchunked_values_and_param_grads(model):
    # gpt2 ties wte to the unembedding (gradient from lookup + chunked head), llama does not
    v0, g0 = _grads(model, None)
    v1, g1 = _grads(model, CHUNK)
    np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-5)
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(flat0) == len(flat1) > 0
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    assert max(float(jnp.abs(a).max()) for a in flat0) > 1e-3  # gradients are not all ~0


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_masked_positions_are_exactly_zero(model, chunk):
    ids, mask, loss = batch()
    out = lm.policy_out(model, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss},
                        chunk_size=chunk)
    tok = np.asarray(out.token_logps)
    assert np.all(tok[np.asarray(loss) == 0] == 0.0)
    assert np.all(tok[np.asarray(loss) == 1] < 0.0)
    assert np.all(np.asarray(lm.token_logps(model, ids, mask))[np.asarray(mask) == 0] == 0.0)
    np.testing.assert_allclose(out.logps, tok.sum(1), rtol=1e-6)
    np.testing.assert_array_equal(out.lengths, np.asarray(loss).sum(1))
    assert out.values is None and out.scores is None


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_padding_invariance(model, chunk):
    r = np.random.default_rng(3)
    row = r.integers(1, V, 9)
    resp = np.zeros(9, np.int32)
    resp[4:] = 1
    seq = nnx.jit(lambda m, *a: lm.sequence_logps(m, *a, chunk_size=chunk))
    plain = seq(model, jnp.asarray(row[None]), jnp.ones((1, 9), jnp.int32), jnp.asarray(resp[None]))
    # the same row left-padded by 3 and right-padded by 4, pad ids arbitrary (not 0)
    ids = np.full((2, 16), 77, np.int32)
    mask = np.zeros((2, 16), np.int32)
    loss = np.zeros((2, 16), np.int32)
    ids[0, 3:12], mask[0, 3:12], loss[0, 3:12] = row, 1, resp
    ids[1, :9], mask[1, :9], loss[1, :9] = row, 1, resp
    padded = seq(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss))
    np.testing.assert_allclose(padded, np.repeat(np.asarray(plain), 2), atol=1e-5)


def test_average_divides_by_response_count(model):
    ids, mask, loss = batch()
    tok = np.asarray(lm.token_logps(model, ids, mask), np.float64)
    cnt = np.asarray(loss).sum(1)
    avg = lm.sequence_logps(model, ids, mask, loss, average=True)
    np.testing.assert_allclose(avg, (tok * np.asarray(loss)).sum(1) / cnt, rtol=1e-5)
    empty = lm.sequence_logps(model, ids, mask, jnp.zeros_like(loss), average=True)
    np.testing.assert_array_equal(empty, np.zeros(4))


def test_policy_out_with_value_head_and_reward_model(model):
    ids, mask, loss = batch()
    b = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}
    pv = PolicyWithValue(model, rngs=nnx.Rngs(5))
    out = lm.policy_out(pv, b, chunk_size=CHUNK)
    plain = lm.policy_out(model, b)
    np.testing.assert_allclose(out.token_logps, plain.token_logps, atol=1e-5)
    _, values = pv(ids, mask)
    np.testing.assert_allclose(out.values, np.asarray(values) * np.asarray(loss), atol=1e-6)
    assert np.all(np.asarray(out.values)[np.asarray(loss) == 0] == 0.0)

    rm = RewardModel(model, rngs=nnx.Rngs(6))
    out = lm.policy_out(rm, b)
    np.testing.assert_allclose(out.scores, rm(ids, mask), atol=1e-6)
    assert out.token_logps.shape == ids.shape and out.logps.shape == (4,)


def test_entropy_matches_float64(model):
    ids, mask, _ = batch()
    z = np.asarray(model(ids, mask), np.float64)[:, :-1]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = -(p * np.log(p)).sum(-1) * np.asarray(mask[:, 1:] * mask[:, :-1])
    np.testing.assert_allclose(lm.entropy(model, ids, mask)[:, 1:], ref, atol=1e-5)


def test_chunked_backward_never_builds_float32_n_by_v():
    # XLA's own buffer accounting: the chunked grad's temporaries stay far below one f32 [n, v].
    n, d, v = 256, 16, 32768
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    tg = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(h, w, tg, chunk):
        if chunk is None:
            lp = jax.nn.log_softmax(h @ w, axis=-1)
            return jnp.sum(jnp.take_along_axis(lp, tg[:, None], axis=-1))
        lse, t = lm.chunked_logsumexp_and_target(h, w, tg, chunk)
        return jnp.sum(t - lse)

    def temp(chunk):
        f = jax.jit(jax.grad(lambda h, w, tg: loss(h, w, tg, chunk), argnums=(0, 1)))
        return f.lower(h, w, tg).compile().memory_analysis().temp_size_in_bytes

    naive = n * v * 4
    assert temp(None) >= naive  # the unchunked path does hold [n, v] (the check can fail)
    assert temp(1024) < naive / 4
