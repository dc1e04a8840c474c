"""Choosing the next token from logits: greedy, or a draw at temperature T restricted to the
top-k, then the top-p set (HF's order). Pure functions of [b, v] logits, jit-friendly; the
rollout engine (`prefjax.sampling`) calls `pick` once per decode step.

CPU costs shaped these codings (one thread, [32, 4096] float32 logits): XLA's argmax runs its
(value, index) reduction unvectorised (0.65 ms, against 0.13 ms for `first_argmax`), and its
sort takes 19 ms, 4-5 decode steps of a small model, where `top_p_cut` takes 0.73 ms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pick(logits: Array, keys: Array, *, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0, greedy: bool = False) -> tuple[Array, Array]:
    """(token [b] int32, its log-prob [b] float32) from logits [b, v], row i drawing with
    keys[i] (typed jax keys [b]; unused when greedy).

    The log-prob is log softmax(logits / T)[token] under the FULL distribution, whatever top-k
    or top-p truncated: the policy's log-prob of its own sample, as the trainers score it.
    top_k 0 and top_p 1 are off.
    """
    z = logits / temperature
    tok = first_argmax(logits) if greedy else draw(z, keys, top_k=top_k, top_p=top_p)
    tok = tok.astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp


def draw(z: Array, keys: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """A token [b] drawn from softmax(z) [b, v] restricted to the top-k, then top-p set.

    With top-k on, everything after `lax.top_k` works on the k candidates only, sorted. Top-p
    alone finds its cut without sorting the vocabulary (`top_p_cut`).
    """
    idx = None
    if 0 < top_k < z.shape[-1]:
        z, idx = jax.lax.top_k(z, top_k)  # sorted descending
    if top_p < 1 and idx is None:
        z = jnp.where(top_p_cut(z, top_p), z, -jnp.inf)
    elif top_p < 1:  # z is sorted: keep the smallest prefix whose mass reaches top_p (a token
        # stays while the mass strictly before it is < top_p, so the most likely token always
        # stays), then every token equal to the last one kept
        ps = jax.nn.softmax(z, axis=-1)
        keep = (jnp.cumsum(ps, axis=-1) - ps) < top_p
        last = jnp.sum(keep, axis=-1, keepdims=True) - 1
        z = jnp.where(z < jnp.take_along_axis(z, last, axis=-1), -jnp.inf, z)
    choice = jax.vmap(jax.random.categorical)(keys, z)  # each row its own stream
    return choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


def top_p_cut(z: Array, top_p: float) -> Array:
    """bool [b, v]: the tokens top-p keeps from logits z [b, v], without sorting them.

    The sorted rule keeps a token while the mass strictly before it is < top_p, and then every
    token whose logit equals the last kept one. That set is {z >= t} for the smallest t with
    mass(z > t) < top_p, and mass(z > t) falls as t grows, so 32 halvings of the float32 range
    find t: floats order as the integers `ordered_bits` maps them to. Equal to the sorted rule
    up to float32 rounding of the mass at the cut (a plain sum here, a cumsum there).
    """
    p = jax.nn.softmax(z, axis=-1)
    key = ordered_bits(z)
    lo = jnp.full((*z.shape[:-1], 1), jnp.iinfo(jnp.int32).min, jnp.int32)
    hi = jnp.max(key, axis=-1, keepdims=True)  # mass above the maximum is 0 < top_p

    def halve(_, bounds):  # invariant: mass(> lo) >= top_p (unless lo is the minimum), not hi
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        below = jnp.sum(jnp.where(key > mid, p, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    _, t = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return key >= t


def ordered_bits(x: Array) -> Array:
    """int32 keys of float32 x that order as x does (-0.0 and 0.0 both map to 0)."""
    i = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def first_argmax(x: Array) -> Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the maximum) for x [b, v] without NaN:
    a max, a compare and a min, which XLA CPU vectorises (see the module doc)."""
    v = x.shape[-1]
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(v), v), axis=-1), v - 1)
