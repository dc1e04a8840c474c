"""KV cache for decoding, and the masked causal attention every prefjax decoder shares."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` slots (a pytree; jit/donate it as a whole).

    k, v:  per layer [b, kv_heads, max_len, head_dim] in the model's compute dtype: a tuple of
           one array per layer (decoders with unrolled layers), or one array
           [layers, b, kv_heads, max_len, head_dim] (decoders that scan their layers).
           Head-major, so attention reads a layer's keys as they are ((b, kv_heads) leading,
           no transpose), and per layer, so a decode step writes each layer's new slot in place
           instead of re-stacking the whole cache (each would copy every cached key on every
           step).
    mask:  int32 [b, max_len]; 1 where a slot holds a real token (padding and unwritten slots: 0).
    index: int32 scalar; the next slot to write (all rows advance together).

    A forward with `cache=` writes its t new tokens at slots `index..index+t-1`, records their
    attention_mask there, lets each new token attend causally to every earlier slot whose mask
    is 1 (and to itself), and returns the cache with `index + t`. Writing past `max_len` is an
    error when `index` is concrete; under jit it is the caller's job (XLA would clamp silently).
    The helpers below work on either form of k / v (batch axis -4, slot axis -2).
    """

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]
    mask: Array
    index: Array

    @classmethod
    def init(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, stacked: bool = False) -> KVCache:
        """An empty cache (all slots free, index 0); `stacked`: one [layers, ...] array."""
        shape = (batch, kv_heads, max_len, head_dim)
        if stacked:
            k, v = (jnp.zeros((layers, *shape), dtype) for _ in range(2))
        else:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(layers)) for _ in range(2))
        return cls(k=k, v=v, mask=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def _kv_map(f, cache: KVCache) -> tuple:
    """(f over every k buffer, f over every v buffer), keeping the tuple / stacked form."""
    return jax.tree.map(f, cache.k), jax.tree.map(f, cache.v)


def _pad_slots(x: Array, lo: int, hi: int) -> Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(lo, hi), (0, 0)])


def rows(cache: KVCache, start: int, stop: int) -> KVCache:
    """The cache of rows `start..stop-1` (same slots and index)."""
    k, v = _kv_map(lambda x: jax.lax.slice_in_dim(x, start, stop, axis=x.ndim - 4), cache)
    return KVCache(k, v, cache.mask[start:stop], cache.index)


def pad_left(cache: KVCache, d: int) -> KVCache:
    """The cache with `d` free slots added before slot 0 and `index + d` (a shorter prefill
    laid out like a longer one)."""
    k, v = _kv_map(lambda x: _pad_slots(x, d, 0), cache)
    return KVCache(k, v, jnp.pad(cache.mask, ((0, 0), (d, 0))), cache.index + d)


def from_prefix(prefix: KVCache, rows: Array, max_len: int) -> KVCache:
    """A cache of `len(rows)` rows and `max_len` slots whose row i starts as `prefix` row
    `rows[i]` (its slots `[0, prefix.max_len)`), index `prefix.max_len`.

    This is how one prompt prefill serves several samples: `rows` may repeat a prefix row.
    """
    p = prefix.max_len
    if max_len < p:
        raise ValueError(f"from_prefix: max_len {max_len} is shorter than the prefix ({p})")
    k, v = _kv_map(lambda x: _pad_slots(jnp.take(x, rows, axis=x.ndim - 4), 0, max_len - p),
                   prefix)
    mask = jnp.pad(jnp.take(prefix.mask, rows, axis=0), ((0, 0), (0, max_len - p)))
    return KVCache(k, v, mask, jnp.asarray(p, jnp.int32))


def place(cache: KVCache, row: Array, prefix: KVCache) -> KVCache:
    """`cache` with row `row` restarted as the 1-row `prefix`: its slots end just before
    `cache.index`, every other slot of the row is masked out (stale keys stay, unseen).

    Needs `cache.index >= prefix.max_len`. The next token of the row is then written at
    `cache.index` like every other row's, so all rows keep one shared write index.
    """
    start = cache.index - prefix.max_len

    def put(x, new):
        lead = (0,) * (x.ndim - 4)
        return jax.lax.dynamic_update_slice(x, new.astype(x.dtype), (*lead, row, 0, start, 0))

    k, v = jax.tree.map(put, cache.k, prefix.k), jax.tree.map(put, cache.v, prefix.v)
    line = jax.lax.dynamic_update_slice(jnp.zeros((1, cache.max_len), jnp.int32),
                                        prefix.mask.astype(jnp.int32), (0, start))
    return cache._replace(k=k, v=v, mask=jax.lax.dynamic_update_slice(cache.mask, line,
                                                                      (row, 0)))


def shift(cache: KVCache, d: int) -> KVCache:
    """`cache` with every row moved `d` slots to the left (the first `d` slots dropped, free
    slots added at the end) and `index - d`.

    Attention depends on slots only through order and distance (causality, the sliding
    window), and positions come from the mask, so a shift changes no output as long as no
    row needs the dropped slots.
    """
    k, v = _kv_map(lambda x: _shift_slots(x, d), cache)
    return KVCache(k, v, jnp.pad(cache.mask[:, d:], ((0, 0), (0, d))), cache.index - d)


def _shift_slots(x: Array, d: int) -> Array:
    """`x` with its slots moved `d` to the left; a stacked [layers, ...] buffer one layer at a
    time, in place: shifted whole, it needed a second buffer the size of the whole cache (the
    TPU compiler held it through the engine's decode loop, benchmarks/rollout_memory.py)."""
    if x.ndim == 4:
        return _pad_slots(x[..., d:, :], 0, d)

    def one(i, x):
        layer = jax.lax.dynamic_index_in_dim(x, i, keepdims=True)
        return jax.lax.dynamic_update_slice_in_dim(x, _pad_slots(layer[..., d:, :], 0, d), i, 0)

    return jax.lax.fori_loop(0, x.shape[0], one, x)


def positions_from_mask(attention_mask: Array) -> Array:
    """`cumsum(mask) - 1` clipped at 0: [b, t] int32; right and left padding both work."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def check_room(cache: KVCache, t: int) -> None:
    """Raise when `t` new tokens do not fit after a concrete `cache.index` (no-op under jit)."""
    try:
        index = int(cache.index)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return
    if index + t > cache.max_len:
        raise ValueError(
            f"KV cache overflow: writing {t} tokens at slot {index} needs {index + t} slots but "
            f"the cache has max_len={cache.max_len}; make it larger with init_cache(b, max_len)")


def extend_mask(cache: KVCache, attention_mask: Array) -> tuple[Array, Array]:
    """(key mask [b, max_len] with the new tokens recorded, positions [b, t] of the new tokens).

    Positions continue the count of real tokens already cached, so a left-padded prompt
    followed by one-token decode steps gets 0, 1, 2, ... on its real tokens.
    """
    m = attention_mask.astype(jnp.int32)
    key_mask = jax.lax.dynamic_update_slice(cache.mask, m, (0, cache.index))
    before = jnp.sum(jnp.where(jnp.arange(cache.max_len) < cache.index, cache.mask, 0), axis=1)
    pos = jnp.maximum(before[:, None] + jnp.cumsum(m, axis=1) - 1, 0)
    return key_mask, pos


def forward_context(attention_mask: Array | None, shape: tuple[int, int],
                    cache: KVCache | None, positions: Array | None):
    """What a decoder forward of `[b, t]` tokens needs, with or without a cache.

    Returns (mask [b, t], key mask [b, t or max_len], positions [b, t], query start, cache write
    index or None). Shared by every decoder so cached and uncached forwards agree by construction.
    """
    b, t = shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    if cache is None:
        key_mask, start, index = mask, 0, None
        pos = positions_from_mask(mask)
    else:
        check_room(cache, t)
        key_mask, pos = extend_mask(cache, mask)
        start = index = cache.index
    return mask, key_mask, (pos if positions is None else positions), start, index


def write(buf: Array, new: Array, index: Array) -> Array:
    """One layer's cache `[b, kh, max_len, d]` with `new` `[b, t, kh, d]` written at slot
    `index`."""
    return jax.lax.dynamic_update_slice(buf, new.swapaxes(1, 2).astype(buf.dtype),
                                        (0, 0, index, 0))


def write_layer(kv: tuple, k: Array, v: Array, index: Array) -> tuple[tuple, Array, Array]:
    """A block's cache update: (cache to return, k and v [b, kh, max_len, d] to attend over).

    kv is one layer's `(k, v)` buffers, or, under scanned layers, the stacked
    `(k, v, layer)`: the new slots are then written into the stacked buffers in place and the
    layer is read back out of them (one copy of that layer; slicing the layer into the scan and
    stacking it out again copied the whole cache twice per decode step).
    """
    if len(kv) == 2:
        k, v = write(kv[0], k, index), write(kv[1], v, index)
        return (k, v), k, v
    ks, vs, layer = kv

    def put(stack, new):
        return jax.lax.dynamic_update_slice(stack, new.swapaxes(1, 2)[None].astype(stack.dtype),
                                            (layer, 0, 0, index, 0))

    ks, vs = put(ks, k), put(vs, v)
    k, v = (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (ks, vs))
    return (ks, vs), k, v


def causal_allowed(key_mask: Array, q_start: Array | int, t: int,
                   window: int | None = None) -> Array:
    """bool [b, t, s]: query i (at slot q_start + i) may see key slot j.

    Causal (j <= slot of i), key real (key_mask[b, j] == 1) and, with a sliding `window`,
    j > slot - window (the query itself plus window - 1 earlier slots, as HF's Mistral).
    Distances are in slots, which equal token distances for contiguous (left- or right-padded)
    rows.
    """
    s = key_mask.shape[1]
    q = q_start + jnp.arange(t)[:, None]
    kpos = jnp.arange(s)[None, :]
    ok = kpos <= q
    if window is not None:
        ok = ok & (kpos > q - window)
    return ok[None] & (key_mask[:, None, :] != 0)


def attend(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    """Grouped-query attention: q [b, t, h, d], k/v [b, s, kh, d], allowed bool [b, t, s].

    Returns [b, t, h, d] in v's dtype. Scores and softmax are float32. Disallowed scores get
    the most negative finite float, so a query with no visible key (a padding row) averages
    uniformly and stays finite instead of producing NaN.

    The scores are computed head-major, one [g * t, s] matrix per (row, kv head), because XLA
    CPU runs batched dots with leading batch dimensions at several times the speed of the
    `btkgd,bskd` layout (benchmarks/README.md); the transposes in and out touch [b, t, h, d]
    only, not the [t, s] scores.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    qh = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4).reshape(b * kh, -1, d)
    kh_, vh = (x.transpose(0, 2, 1, 3).reshape(b * kh, s, d) for x in (k, v))
    o = _attention(qh, kh_, vh, allowed, scale)  # [b * kh, g * t, d]
    return o.reshape(b, kh, h // kh, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def attend_heads(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    """`attend` with k/v head-major [b, kh, s, d] (a KV cache's layout), read as they are.

    The dots keep (b, kh) as two leading batch dimensions: a reshape of the cache to
    [b * kh, s, d] between its update and the dot made XLA CPU fuse the update once per
    consumer, copying the whole buffer each time.
    """
    b, t, h, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    qh = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    z = jnp.einsum("bkqd,bksd->bkqs", qh, k, preferred_element_type=jnp.float32)
    z = z.reshape(b, kh, g, t, s)
    z = jnp.where(allowed[:, None, None], z * scale, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(z, axis=-1).reshape(b, kh, g * t, s)
    o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v)
    return o.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _masked_scores(q: Array, k: Array, allowed: Array, scale: float) -> Array:
    """float32 scores [b * kh, g * t, s] of q [b * kh, g * t, d], k [b * kh, s, d]."""
    n, gt, _ = q.shape
    b, t, s = allowed.shape
    z = jnp.einsum("nqd,nsd->nqs", q, k, preferred_element_type=jnp.float32)
    z = z.reshape(b, n // b, gt // t, t, s)
    z = jnp.where(allowed[:, None, None], z * scale, jnp.finfo(jnp.float32).min)
    return z.reshape(n, gt, s)


# An explicit backward: autodiff of softmax re-derives the row sums of p * dp over the [t, s]
# scores; the flash-attention identity sum_s p * dp = sum_d o * do gets them from [t, d].
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    return _attention_fwd(q, k, v, allowed, scale)[0]


def _attention_fwd(q, k, v, allowed, scale):
    p = jax.nn.softmax(_masked_scores(q, k, allowed, scale), axis=-1)
    o = jnp.einsum("nqs,nsd->nqd", p.astype(v.dtype), v)
    return o, (q, k, v, allowed, p, o)


def _attention_bwd(scale, res, do):
    q, k, v, allowed, p, o = res
    n, gt, s = p.shape
    b, t, _ = allowed.shape
    dp = jnp.einsum("nqd,nsd->nqs", do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta) * scale).reshape(b, n // b, gt // t, t, s)
    # a masked score is a constant: no gradient, also in a row with no visible key (where the
    # uniform p is not 0)
    ds = jnp.where(allowed[:, None, None], ds, 0.0).reshape(n, gt, s).astype(q.dtype)
    dq = jnp.einsum("nqs,nsd->nqd", ds, k)
    dk = jnp.einsum("nqs,nqd->nsd", ds, q)
    dv = jnp.einsum("nqs,nqd->nsd", p.astype(do.dtype), do)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
