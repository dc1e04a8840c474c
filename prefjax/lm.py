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


def _block_start(i: Array, chunk: int, width: int) -> Array:
    """First column of vocabulary block i: i * chunk, clamped so the block ends at `width`.

    The last block of a vocabulary that `chunk` does not divide is shifted left to overlap its
    predecessor (its overlapping columns are masked in `_block`), so no padded copy of the
    [d, v] matrix is ever made."""
    return jnp.minimum(i * chunk, width - chunk)


def _block(h: Array, w: Array, i: Array, chunk: int, v: int, axis: int = 1) -> Array:
    """float32 logits [n, chunk] of vocabulary block i of h [n, d] and w ([d, v'] for axis 1,
    [v', d] for axis 0); columns of earlier blocks (the shifted last block) and columns at or
    past v (padding, when v' > v) are -inf."""
    start = _block_start(i, chunk, w.shape[axis])
    wc = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=axis)
    z = jax.lax.dot_general(h, wc, (((1,), (1 - axis,)), ((), ())),
                            preferred_element_type=jnp.float32)
    cols = start + jnp.arange(chunk)
    return jnp.where((cols[None, :] >= i * chunk) & (cols[None, :] < v), z, -jnp.inf)


def _num_blocks(v: int, chunk: int) -> int:
    return -(-v // chunk)


def _pad_vocab(w: Array, chunk: int) -> Array:
    v = w.shape[1]
    pad = -v % chunk
    return w if pad == 0 else jnp.pad(w, ((0, 0), (0, pad)))


def _lse_fwd_impl(chunk: int, axis: int, h: Array, w: Array) -> Array:
    v = w.shape[axis]
    n = h.shape[0]

    def body(carry, i):
        m, s = carry
        z = _block(h, w, i, chunk, v, axis)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return (m_new, s), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s), _ = jax.lax.scan(body, init, jnp.arange(_num_blocks(v, chunk)))
    return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_lse(chunk: int, axis: int, h: Array, w: Array) -> Array:
    return _lse_fwd_impl(chunk, axis, h, w)


def _chunked_lse_fwd(chunk, axis, h, w):
    lse = _lse_fwd_impl(chunk, axis, h, w)
    return lse, (h, w, lse)


def _chunked_lse_bwd(chunk, axis, res, g):
    # d lse / d z = softmax(z); each block's softmax is recomputed from (h, w, lse), so the
    # backward holds one [n, chunk] block at a time, like the forward. dw is accumulated in
    # place in w's own layout (no stacked blocks, no transposed or padded copy of w).
    h, w, lse = res
    v = w.shape[axis]
    h32 = h.astype(jnp.float32)  # dw in float32: rounding dz to bf16 would cost ~1% of dw

    def body(carry, i):
        dh, dw = carry
        z = _block(h, w, i, chunk, v, axis)
        dz = g[:, None] * jnp.exp(z - lse[:, None])  # [n, chunk] float32, 0 where masked
        start = _block_start(i, chunk, v)
        wc = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=axis).astype(jnp.float32)
        dh = dh + jax.lax.dot_general(dz, wc, (((1,), (axis,)), ((), ())))
        # [d, chunk] for axis 1, [chunk, d] for axis 0; added, as the shifted last block
        # overlaps columns already written (its dz there is 0)
        dwc = jnp.matmul(h32.T, dz) if axis == 1 else jnp.matmul(dz.T, h32)
        old = jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=axis)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dwc.astype(dw.dtype), start, axis)
        return (dh, dw), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(_num_blocks(v, chunk)))
    return dh.astype(h.dtype), dw.astype(w.dtype)


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
    # vocabulary-major blocks of w.T: for a tied embedding w is itself `embedding.T`, so w.T
    # is the stored [v, d] array (the transposes cancel) and its gradient needs no transpose
    # (about 1x the embedding's size of temporaries less than slicing w's columns)
    wr = w.T  # [v, d]
    lse = _chunked_lse(chunk, 0, h, wr)
    wt = jnp.take(wr, targets, axis=0)  # [n, d], gathered (and scattered back) in wr's layout
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
                      *, chunk_size: int | None = None, temperature: float = 1.0) -> Array:
    """Token log-probs [b, t] float32 from hidden states h [b, t, d] and unembedding w [d, v].

    Column t (t >= 1) is log p(ids[t] | ids[:t]) from h[:, t-1]; it is 0 unless both
    ids[t] and ids[t-1] are real tokens (so padding, and the first real token of a
    left-padded row, which has no real context, score 0).
    temperature: log-probs of softmax(logits / T), the distribution a sampler at temperature T
    draws from (online RL scores its samples at T, as TRL's PPO/GRPO/RLOO do).
    """
    b, t, d = h.shape
    hs, tg = h[:, :-1].reshape(-1, d), input_ids[:, 1:].reshape(-1)
    if temperature != 1.0:
        # (h / T) @ w == (h @ w) / T: scaling the [n, d] input keeps the log-softmax kernels
        # (and their custom VJPs) unchanged
        hs = hs * jnp.asarray(1.0 / _check_temperature(temperature), hs.dtype)
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


def policy_out(model, batch: Batch, *, chunk_size: int | None = None,
               temperature: float = 1.0) -> PolicyOut:
    """The `PolicyOut` a loss consumes, from ONE forward of batch input_ids / attention_mask.

    token_logps are zeroed where loss_mask is 0 (loss_mask defaults to attention_mask), and
    are log-probs of softmax(logits / temperature) (default 1: the model's own distribution).
    A `PolicyWithValue` also fills `values` [b, t] (zeroed where loss_mask is 0); a
    `RewardModel` fills `scores` [b] and returns zero log-probs of the right shapes.
    A packed batch (`prefjax.data.packing`) runs the model on its packed rows instead and gives
    the same PolicyOut, in the batch's [b] / [b, t] layout (`packed_policy_out`).
    """
    if "packed_input_ids" in batch:
        return packed_policy_out(model, batch, chunk_size=chunk_size, temperature=temperature)
    return _policy_out_and_hidden(model, batch, chunk_size, temperature)[0]


def packed_policy_out(model, batch: Batch, *, chunk_size: int | None = None,
                      temperature: float = 1.0) -> PolicyOut:
    """`policy_out` of a packed batch: one forward of packed_input_ids [r, T] with its
    segment ids and positions, then each sequence's token log-probs gathered back into the
    right-padded [b, t] layout by `pack_index` (so they equal the padded forward's).

    A token scores only when its predecessor is in the same segment (the first token of each
    packed sequence, like column 0 of a padded row, has no context). A `RewardModel` reads each
    sequence's last real token; a value head is not supported (online data is not packed).
    """
    ids, seg, pos = (batch[k] for k in ("packed_input_ids", "packed_segment_ids",
                                        "packed_positions"))
    index, mask = batch["pack_index"], batch["attention_mask"]
    loss_mask = batch.get("loss_mask", mask).astype(jnp.float32)
    lengths = jnp.sum(loss_mask, axis=-1)
    decoder = model.decoder if isinstance(model, RewardModel) else model
    if isinstance(model, PolicyWithValue):
        raise ValueError("packed batches carry no value-head layout; PPO rollouts are not "
                         "packed (set data.packing=False)")
    pmask = (seg != 0).astype(jnp.int32)
    h, _ = decoder.hidden_states(ids, pmask, positions=pos, segment_ids=seg)
    r, T, d = h.shape
    # this call sees whole micro-batch groups of packed rows (packing.py): the tokens of its
    # sequences sit at pack_index modulo its own r * T slots
    index = index % (r * T)
    if isinstance(model, RewardModel):
        last = jnp.take_along_axis(index, jnp.maximum(jnp.sum(mask, -1) - 1, 0)[:, None], 1)
        scores = model.head(h.reshape(r * T, d)[last[:, 0]])
        zeros = jnp.zeros(mask.shape, jnp.float32)
        return PolicyOut(zeros, zeros[:, 0], lengths, scores=scores)
    lp = logps_from_hidden(h, model.unembed(), ids, pmask, chunk_size=chunk_size,
                           temperature=temperature)
    same = jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (1, 0)))
    lp = jnp.where(same, lp, 0.0).reshape(r * T)
    tok = jnp.where(mask != 0, lp[index], 0.0) * loss_mask
    return PolicyOut(tok, jnp.sum(tok, axis=-1), lengths)


def _policy_out_and_hidden(model, batch: Batch, chunk_size: int | None, temperature: float
                           ) -> tuple[PolicyOut, Array | None]:
    """`policy_out` and the hidden states [b, t, d] it read (None for a reward model)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    loss_mask = batch.get("loss_mask", mask).astype(jnp.float32)
    lengths = jnp.sum(loss_mask, axis=-1)
    if isinstance(model, RewardModel):
        scores = model(ids, mask)
        zeros = jnp.zeros(ids.shape, jnp.float32)
        return PolicyOut(zeros, zeros[:, 0], lengths, scores=scores), None
    values = None
    if isinstance(model, PolicyWithValue):
        h, values = model(ids, mask)
        values = values * loss_mask
    else:
        h, _ = model.hidden_states(ids, mask)
    tok = logps_from_hidden(h, model.unembed(), ids, mask, chunk_size=chunk_size,
                            temperature=temperature) * loss_mask
    return PolicyOut(tok, jnp.sum(tok, axis=-1), lengths, values=values), h


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


ENTROPY_CHUNK = 4096  # vocabulary block of `entropy_from_hidden` when no chunk size is given


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to score log-probs at it, got {temperature!r}")
    return float(temperature)


def entropy_from_hidden(h: Array, w: Array, *, chunk_size: int | None = None,
                        temperature: float = 1.0) -> Array:
    """[n] float32 entropy of softmax((h @ w) / T) from h [n, d] and w [d, v], chunked over v.

    H = logsumexp(z) - sum_v p_v z_v, with z = logits / T, accumulated over vocabulary blocks
    of `chunk_size` (default ENTROPY_CHUNK) as a running (max, sum e^(z-max), sum e^(z-max) z),
    so no [n, v] float32 array exists. Forward only (no gradient flows): it is a rollout
    diagnostic, not an entropy bonus.
    """
    t = _check_temperature(temperature)
    h, w = jax.lax.stop_gradient(h), jax.lax.stop_gradient(w)
    v = w.shape[1]
    chunk = min(int(chunk_size or ENTROPY_CHUNK), v)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")

    def body(carry, i):
        m, s, u = carry
        z = _block(h, w, i, chunk, v) / t  # masked columns (overlap of the last block) stay -inf
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        e = jnp.exp(z - m_new[:, None])  # 0 at padded columns
        scale = jnp.exp(m - m_new)
        s = s * scale + jnp.sum(e, axis=1)
        u = u * scale + jnp.sum(e * jnp.where(jnp.isfinite(z), z, 0.0), axis=1)
        return (m_new, s, u), None

    n = h.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    (m, s, u), _ = jax.lax.scan(body, init, jnp.arange(_num_blocks(v, chunk)))
    return m + jnp.log(s) - u / s


def policy_out_and_entropy(model, batch: Batch, *, chunk_size: int | None = None,
                           temperature: float = 1.0, entropy_chunk: int | None = None
                           ) -> tuple[PolicyOut, Array]:
    """`policy_out(model, batch, ...)` and the entropy [b, t] float32 of the next-token
    distribution at temperature T, from the same forward (no gradient through the entropy).

    Column t is H(softmax(z_{t-1} / T)), the distribution token t was drawn from (the alignment
    of token_logps), 0 where loss_mask is 0. Chunked over the vocabulary (`entropy_chunk`,
    default `chunk_size` or ENTROPY_CHUNK), so the float32 [b, t, v] logits never exist at once.
    """
    out, h = _policy_out_and_hidden(model, batch, chunk_size, temperature)
    if h is None:
        raise ValueError("policy_out_and_entropy needs a policy, got a reward model")
    b, t, d = h.shape
    ent = entropy_from_hidden(h[:, :-1].reshape(-1, d), model.unembed(),
                              chunk_size=entropy_chunk or chunk_size, temperature=temperature)
    ent = jnp.pad(ent.reshape(b, t - 1), ((0, 0), (1, 0)))
    mask = batch.get("loss_mask", batch["attention_mask"])
    return out, jnp.where(mask > 0, ent, 0.0)
