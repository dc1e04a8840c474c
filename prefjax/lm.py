"""Token and sequence log-probs of a decoder, with an optional vocabulary-chunked log-softmax.

Alignment (prefjax/typing.py): `token_logps[:, t] = log p(ids[t] | ids[:t])`, column 0 is 0.
Every function reads the model only through `hidden_states(ids, mask, positions=)` [b, t, d] and
`unembed()` [d, v], so with `chunk_size` the float32 logits `[b, t, v]` never exist: the
log-normaliser is a running logsumexp over vocabulary blocks, and its custom VJP recomputes each
block in the backward pass instead of storing it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prefjax.models.heads import PolicyWithValue, RewardModel
from prefjax.models.linear import weight_grad
from prefjax.typing import Batch, PolicyOut

Array = jax.Array


def _block(h: Array, w: Array, i: Array, chunk: int, v: int) -> Array:
    """float32 logits [n, chunk] of vocabulary block i; columns past v are -inf."""
    wc = jax.lax.dynamic_slice_in_dim(w, i * chunk, chunk, axis=1)
    z = jnp.matmul(h, wc, preferred_element_type=jnp.float32)
    cols = i * chunk + jnp.arange(chunk)
    return jnp.where(cols[None, :] < v, z, -jnp.inf)


def _pad_vocab(w: Array, chunk: int) -> Array:
    v = w.shape[1]
    pad = -v % chunk
    return w if pad == 0 else jnp.pad(w, ((0, 0), (0, pad)))


def _lse_fwd_impl(chunk: int, h: Array, w: Array) -> Array:
    v = w.shape[1]
    wp = _pad_vocab(w, chunk)
    n = h.shape[0]

    def body(carry, i):
        m, s = carry
        z = _block(h, wp, i, chunk, v)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return (m_new, s), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s), _ = jax.lax.scan(body, init, jnp.arange(wp.shape[1] // chunk))
    return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_lse(chunk: int, h: Array, w: Array) -> Array:
    return _lse_fwd_impl(chunk, h, w)


def _chunked_lse_fwd(chunk, h, w):
    lse = _lse_fwd_impl(chunk, h, w)
    return lse, (h, w, lse)


def _chunked_lse_bwd(chunk, res, g):
    # d lse / d z = softmax(z); each block's softmax is recomputed from (h, w, lse), so the
    # backward holds one [n, chunk] block at a time, like the forward.
    h, w, lse = res
    v = w.shape[1]
    wp = _pad_vocab(w, chunk)
    h32 = h.astype(jnp.float32)  # dw in float32: rounding dz to bf16 would cost ~1% of dw

    def body(dh, i):
        z = _block(h, wp, i, chunk, v)
        dz = g[:, None] * jnp.exp(z - lse[:, None])  # [n, chunk] float32
        wc = jax.lax.dynamic_slice_in_dim(wp, i * chunk, chunk, axis=1)
        dh = dh + jnp.matmul(dz, wc.T.astype(jnp.float32))
        dw = jnp.matmul(h32.T, dz)
        return dh, dw.astype(w.dtype)

    nb = wp.shape[1] // chunk
    dh, dws = jax.lax.scan(body, jnp.zeros(h.shape, jnp.float32), jnp.arange(nb))
    dw = jnp.moveaxis(dws, 0, 1).reshape(w.shape[0], nb * chunk)[:, :v]
    return dh.astype(h.dtype), dw


_chunked_lse.defvjp(_chunked_lse_fwd, _chunked_lse_bwd)


def chunked_logsumexp_and_target(h: Array, w: Array, targets: Array, chunk: int
                                 ) -> tuple[Array, Array]:
    """(logsumexp_v (h @ w) [n], (h @ w)[n, targets] [n]), both float32, chunked over v.

    h [n, d], w [d, v], targets int [n], chunk: vocabulary block size (need not divide v; the
    tail block is masked). Neither pass builds [n, v]: the forward keeps a running logsumexp,
    the custom VJP recomputes blocks. The target logit is `h . w[:, target]` (a gather).
    """
    if chunk <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk}")
    chunk = min(int(chunk), w.shape[1])
    lse = _chunked_lse(chunk, h, w)
    wt = jnp.take(w, targets, axis=1).T  # [n, d]
    tgt = jnp.sum(h.astype(jnp.float32) * wt.astype(jnp.float32), axis=-1)
    return lse, tgt


@jax.custom_vjp
def target_logps(h: Array, w: Array, targets: Array) -> Array:
    """log softmax(h @ w)[n, targets] [n] float32 from h [n, d], w [d, v], targets int [n].

    Unchunked: the float32 logits [n, v] are built once and kept for the backward. The VJP is
    written out, dz = g (onehot(targets) - softmax(z)), so the backward is one elementwise pass
    over [n, v] instead of autodiff's log-softmax transpose plus a scatter of the gather's
    cotangent into a materialized [n, v] zero array.
    """
    return _target_logps_fwd(h, w, targets)[0]


def _target_logps_fwd(h, w, targets):
    z = jnp.matmul(h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    tgt = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return tgt - lse, (h, w, targets, z, lse)


def _target_logps_bwd(res, g):
    h, w, targets, z, lse = res
    onehot = jnp.arange(z.shape[1])[None, :] == targets[:, None]
    dz = g[:, None] * (onehot.astype(jnp.float32) - jnp.exp(z - lse[:, None]))
    # the products run in the compute dtype (as autodiff of the bf16 matmul would) with float32
    # accumulation; for float32 compute this is the exact gradient
    dh = jnp.matmul(dz.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
    dw = weight_grad(h, dz.astype(h.dtype), jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


target_logps.defvjp(_target_logps_fwd, _target_logps_bwd)


def logps_from_hidden(h: Array, w: Array, input_ids: Array, attention_mask: Array | None = None,
                      *, chunk_size: int | None = None) -> Array:
    """Token log-probs [b, t] float32 from hidden states h [b, t, d] and unembedding w [d, v].

    Column t (t >= 1) is log p(ids[t] | ids[:t]) from h[:, t-1]; it is 0 unless both
    ids[t] and ids[t-1] are real tokens (so padding, and the first real token of a
    left-padded row, which has no real context, score 0).
    """
    b, t, d = h.shape
    hs, tg = h[:, :-1].reshape(-1, d), input_ids[:, 1:].reshape(-1)
    if chunk_size is None:
        lp = target_logps(hs, w, tg)
    else:
        lse, tgt = chunked_logsumexp_and_target(hs, w, tg, chunk_size)
        lp = tgt - lse
    lp = lp.reshape(b, t - 1)
    if attention_mask is not None:
        m = attention_mask.astype(bool)
        lp = jnp.where(m[:, 1:] & m[:, :-1], lp, 0.0)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def token_logps(model, input_ids: Array, attention_mask: Array | None = None, *,
                chunk_size: int | None = None, positions: Array | None = None) -> Array:
    """[b, t] float32 log p(ids[t] | ids[:t]) (0 at t=0 and at padding) from one forward."""
    h, _ = model.hidden_states(input_ids, attention_mask, positions=positions)
    return logps_from_hidden(h, model.unembed(), input_ids, attention_mask,
                             chunk_size=chunk_size)


def _masked_sum(tok: Array, loss_mask: Array, average: bool) -> Array:
    m = loss_mask.astype(jnp.float32)
    s = jnp.sum(tok * m, axis=-1)
    return s / jnp.maximum(jnp.sum(m, axis=-1), 1.0) if average else s


def sequence_logps(model, input_ids: Array, attention_mask: Array, loss_mask: Array, *,
                   average: bool = False, chunk_size: int | None = None) -> Array:
    """[b] float32: sum (or mean, `average=True`) of token log-probs where loss_mask is 1.

    Rows with an empty loss_mask give 0 (the mean divides by max(count, 1)).
    """
    tok = token_logps(model, input_ids, attention_mask, chunk_size=chunk_size)
    return _masked_sum(tok, loss_mask, average)


def policy_out(model, batch: Batch, *, chunk_size: int | None = None) -> PolicyOut:
    """The `PolicyOut` a loss consumes, from ONE forward of batch input_ids / attention_mask.

    token_logps are zeroed where loss_mask is 0 (loss_mask defaults to attention_mask).
    A `PolicyWithValue` also fills `values` [b, t] (zeroed where loss_mask is 0); a
    `RewardModel` fills `scores` [b] and returns zero log-probs of the right shapes.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    loss_mask = batch.get("loss_mask", mask).astype(jnp.float32)
    lengths = jnp.sum(loss_mask, axis=-1)
    if isinstance(model, RewardModel):
        scores = model(ids, mask)
        zeros = jnp.zeros(ids.shape, jnp.float32)
        return PolicyOut(zeros, zeros[:, 0], lengths, scores=scores)
    values = None
    if isinstance(model, PolicyWithValue):
        h, values = model(ids, mask)
        values = values * loss_mask
    else:
        h, _ = model.hidden_states(ids, mask)
    tok = logps_from_hidden(h, model.unembed(), ids, mask, chunk_size=chunk_size) * loss_mask
    return PolicyOut(tok, jnp.sum(tok, axis=-1), lengths, values=values)


def entropy(model, input_ids: Array, attention_mask: Array | None = None) -> Array:
    """[b, t] float32 entropy of the next-token distribution at each position (unchunked).

    Column t is the entropy of p(. | ids[:t]) (same alignment as token_logps); 0 at t=0
    and where token_logps is 0 because of padding.
    """
    h, _ = model.hidden_states(input_ids, attention_mask)
    z = jnp.matmul(h[:, :-1], model.unembed(), preferred_element_type=jnp.float32)
    lp = jax.nn.log_softmax(z, axis=-1)
    ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
    if attention_mask is not None:
        m = attention_mask.astype(bool)
        ent = jnp.where(m[:, 1:] & m[:, :-1], ent, 0.0)
    return jnp.pad(ent, ((0, 0), (1, 0)))
