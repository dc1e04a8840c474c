"""Causal grouped-query attention behind one signature, with selectable implementations.

`attend(q, k, v, key_mask=..., q_start=..., window=..., scale=..., impl=...)` has the semantics of
`cache.attend(q, k, v, cache.causal_allowed(key_mask, q_start, t, window), scale)` for every
`impl`; the implementations differ in what they save for the backward pass and where they run:

- "xla": the reference (`cache.attend`); saves the float32 [b, h, t, s] probabilities.
- "blockwise": flash-style pure JAX (online softmax over key blocks, custom VJP); saves q, k, v,
  the output and a float32 logsumexp per query: O(t) per layer. Runs on every backend.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only, bf16/fp16 only;
  its mask is an explicit bool [b, 1, t, s] (shared by heads and layers, not saved per layer).
- "splash": Pallas splash attention; TPU only, q_start and window static, t and s multiples of
  128; under a context mesh (`jax.set_mesh`) it runs in shard_map over rows and heads.

Masks are built from slot positions (and, inside "blockwise", per block). Packed rows (several
sequences per row, prefjax.data.packing) pass `segment_ids` [b, s]: a query then sees only keys
of its own segment, in every implementation (one more term of the mask; splash's native
SegmentIds). Each segment must be one contiguous run of slots, as packing lays them out.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from prefjax.models import cache as kvc

Array = jax.Array

IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "splash")


def attend(q: Array, k: Array, v: Array, *, key_mask: Array, q_start: Array | int,
           window: int | None = None, scale: float, impl: str = "xla",
           block_q: int = 128, block_k: int = 256, segment_ids: Array | None = None) -> Array:
    """Causal attention of q [b, t, h, d] over k/v [b, s, kh, d] (h a multiple of kh).

    key_mask int/bool [b, s]: 1 where a key slot holds a real token. q_start: the key slot of
    query 0 (0 without a KV cache, `cache.index` when decoding). window: sliding window size or
    None. Returns [b, t, h, d] in v's dtype; a query with no visible key stays finite (it
    averages v uniformly over all s slots, as the reference does). block_q / block_k: tile sizes
    of "blockwise" (clipped to t / s; t and s need not be multiples). segment_ids int [b, s]
    or None: the segment of each key slot; query i belongs to the segment of its slot
    q_start + i and sees only keys of that segment (packed rows; contiguous runs).
    """
    _check(q, k, v, key_mask, window, impl, segment_ids)
    t = q.shape[1]
    if impl == "xla":
        return kvc.attend(q, k, v, allowed(key_mask, q_start, t, window, segment_ids), scale)
    if impl == "blockwise":
        return blockwise(q, k, v, key_mask=key_mask, q_start=q_start, window=window,
                         scale=scale, block_q=block_q, block_k=block_k,
                         segment_ids=segment_ids)
    if impl == "cudnn":
        return _cudnn(q, k, v, key_mask, q_start, window, scale, segment_ids=segment_ids)
    return _splash(q, k, v, key_mask, q_start, window, scale, segment_ids=segment_ids)


def attend_cached(q: Array, k: Array, v: Array, *, key_mask: Array, q_start: Array | int,
                  window: int | None = None, scale: float, impl: str = "xla") -> Array:
    """`attend` over a KV cache's head-major buffers k/v [b, kh, s, d] (`cache.KVCache`).

    A decode step (t == 1) reads them as they are with "xla" whatever `impl` says: its scores
    are only [b, h, 1, s], so a kernel saves nothing, and the other implementations would take
    the whole cache transposed to [b, s, kh, d], a copy of every cached key on every step.
    Longer queries (a prefill into a cache) use `impl` on the transposed buffers, except
    "splash", which needs a static q_start and a cache's is traced: "blockwise" there.
    """
    ks, vs = k.swapaxes(1, 2), v.swapaxes(1, 2)
    _check(q, ks, vs, key_mask, window, impl)  # on the "xla" path the transposes are dead code
    if impl != "xla" and q.shape[1] > 1:
        return attend(q, ks, vs, key_mask=key_mask, q_start=q_start, window=window,
                      scale=scale, impl="blockwise" if impl == "splash" else impl)
    return kvc.attend_heads(q, k, v, allowed(key_mask, q_start, q.shape[1], window), scale)


def query_segments(segment_ids: Array, q_start: Array | int, t: int) -> Array:
    """int [b, t]: the segment of each query (that of its slot q_start + i)."""
    if isinstance(q_start, int) and q_start == 0 and segment_ids.shape[1] == t:
        return segment_ids
    return jax.lax.dynamic_slice_in_dim(segment_ids, jnp.asarray(q_start, jnp.int32), t, axis=1)


def segment_positions(segment_ids: Array) -> Array:
    """int32 [b, t]: 0, 1, 2, ... within each contiguous run of equal segment ids (packed rows
    restart their positions at every sequence; padding runs count too and are never read)."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new_run = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                      constant_values=True)
    return idx - jax.lax.cummax(jnp.where(new_run, idx, 0), axis=1)


def allowed(key_mask: Array, q_start: Array | int, t: int, window: int | None = None,
            segment_ids: Array | None = None) -> Array:
    """bool [b, t, s]: `cache.causal_allowed`, and with segment_ids the same segment too."""
    ok = kvc.causal_allowed(key_mask, q_start, t, window)
    if segment_ids is None:
        return ok
    return ok & (query_segments(segment_ids, q_start, t)[:, :, None] == segment_ids[:, None, :])


def _check(q, k, v, key_mask, window, impl, segment_ids=None) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q must be [b, t, h, d] and k, v equal [b, s, kh, d]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree on batch or head_dim, "
                         f"or q heads are not a multiple of kv heads")
    if key_mask.shape != (b, k.shape[1]):
        raise ValueError(f"attention: key_mask must be [b, s] = {(b, k.shape[1])}, "
                         f"got {key_mask.shape}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    if segment_ids is not None and segment_ids.shape != key_mask.shape:
        raise ValueError(f"attention: segment_ids must be [b, s] = {key_mask.shape} like "
                         f"key_mask, got {segment_ids.shape}")
    if segment_ids is not None and q.shape[1] > k.shape[1]:
        raise ValueError(f"attention: segment_ids need t <= s (got t={q.shape[1]}, "
                         f"s={k.shape[1]})")


# ------------------------------------------------------------------------------------------
# blockwise: online softmax over key blocks with an O(t) custom VJP


def blockwise(q: Array, k: Array, v: Array, *, key_mask: Array, q_start: Array | int,
              window: int | None = None, scale: float, block_q: int = 128,
              block_k: int = 256, segment_ids: Array | None = None) -> Array:
    """Flash-style attention, same contract as `attend`; saves O(t) for the backward pass.

    q is cut into blocks of block_q queries and k/v into blocks of block_k slots (the last
    ones zero-padded); for each query block only the key blocks that hold a causally visible
    (and in-window) slot are visited, so decoding (t small, s = max_len) reads only the slots
    up to q_start + t.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = max(1, min(block_q, t)), max(1, min(block_k, s))
    nq, nk = -(-t // bq), -(-s // bk)
    pad_t, pad_s = ((0, 0), (0, nq * bq - t)), ((0, 0), (0, nk * bk - s))
    qb = jnp.pad(q, pad_t + ((0, 0),) * 2).reshape(b, nq, bq, kh, h // kh, d)
    qb = qb.transpose(1, 0, 3, 4, 2, 5)  # [nq, b, kh, g, bq, d]
    kb, vb = (jnp.pad(x, pad_s + ((0, 0),) * 2).reshape(b, nk, bk, kh, d)
              .transpose(1, 0, 3, 2, 4) for x in (k, v))  # [nk, b, kh, bk, d]
    mb = jnp.pad(key_mask != 0, pad_s).reshape(b, nk, bk).transpose(1, 0, 2)  # [nk, b, bk]
    start = jnp.asarray(q_start, jnp.int32)
    seg = None
    if segment_ids is not None:  # (query segments [nq, b, bq], key segments [nk, b, bk])
        sq = jnp.pad(query_segments(segment_ids, q_start, t), pad_t, constant_values=-1)
        sk = jnp.pad(segment_ids, pad_s, constant_values=-2)
        seg = (sq.reshape(b, nq, bq).transpose(1, 0, 2), sk.reshape(b, nk, bk).transpose(1, 0, 2))
    o = _flash(qb, kb, vb, mb, start, seg, window, float(scale), s)  # [nq, b, kh, g, bq, d]
    return o.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, h, d)[:, :t]


def _key_blocks(q_lo, bq: int, bk: int, nk: int, window: int | None):
    """[lo, hi): the key blocks that can hold a visible slot for queries at q_lo..q_lo+bq-1."""
    hi = jnp.minimum(nk, (q_lo + bq - 1) // bk + 1)
    lo = 0 if window is None else jnp.clip((q_lo - window + 1) // bk, 0, nk)
    return lo, hi


def _block_allowed(q_lo, j, bq: int, bk: int, kmask: Array, window: int | None,
                   segs=None) -> Array:
    """bool [b, bq, bk]: query q_lo + i may see slot j * bk + c (causal, window, key real, and
    with `segs` = (query segments [b, bq], key segments [b, bk]) the same segment)."""
    qpos = q_lo + jnp.arange(bq)[:, None]
    kpos = j * bk + jnp.arange(bk)[None, :]
    ok = kpos <= qpos
    if window is not None:
        ok = ok & (kpos > qpos - window)
    ok = ok[None] & kmask[:, None, :]
    if segs is not None:
        ok = ok & (segs[0][:, :, None] == segs[1][:, None, :])
    return ok


def _scores(qi, kj, ok, scale, dtype):
    """Scaled scores [b, kh, g, bq, bk] in `dtype`; -inf where not allowed."""
    z = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=dtype) * scale
    return jnp.where(ok[:, None, None], z, -jnp.inf)


def _segs(seg, i, j):
    """(query segments of q block i, key segments of k block j), or None without segments."""
    return None if seg is None else (seg[0][i], seg[1][j])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(qb, kb, vb, mb, start, seg, window, scale, s):
    return _flash_fwd(qb, kb, vb, mb, start, seg, window, scale, s)[0]


def _flash_fwd(qb, kb, vb, mb, start, seg, window, scale, s):
    nq, b, kh, g, bq, d = qb.shape
    nk, bk = kb.shape[0], kb.shape[3]
    st = jnp.promote_types(jnp.float32, qb.dtype)  # softmax statistics dtype

    def q_block(_, x):
        qi, i = x
        q_lo = start + i * bq

        def k_block(j, carry):
            acc, m, l = carry
            ok = _block_allowed(q_lo, j, bq, bk, mb[j], window, _segs(seg, i, j))
            z = _scores(qi, kb[j], ok, scale, st)
            m_new = jnp.maximum(m, z.max(-1))  # m starts finite, so z - m_new is never nan
            p = jnp.exp(z - m_new[..., None])
            c = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j],
                            preferred_element_type=st)
            return acc * c[..., None] + pv, m_new, l * c + p.sum(-1)

        init = (jnp.zeros((b, kh, g, bq, d), st), jnp.full((b, kh, g, bq), jnp.finfo(st).min, st),
                jnp.zeros((b, kh, g, bq), st))
        lo, hi = _key_blocks(q_lo, bq, bk, nk, window)
        acc, m, l = jax.lax.fori_loop(lo, hi, k_block, init)
        seen = l > 0  # some key visible; l >= 1 then (the max term is exp(0))
        o = acc / jnp.where(seen, l, 1.0)[..., None]
        # +inf marks a query with no visible key: the backward's exp(z - lse) is 0 there
        return None, (o, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf))

    _, (o, lse) = jax.lax.scan(q_block, None, (qb, jnp.arange(nq)))
    # no visible key: the reference's all-equal masked scores give the mean of v over s slots
    vmean = vb.astype(st).sum((0, 3)) / s  # [b, kh, d]
    o = jnp.where(jnp.isinf(lse)[..., None], vmean[None, :, :, None, None], o).astype(vb.dtype)
    return o, (qb, kb, vb, mb, start, seg, o, lse)


def _flash_bwd(window, scale, s, res, do):
    qb, kb, vb, mb, start, seg, o, lse = res
    nq, b, kh, g, bq, d = qb.shape
    nk, bk = kb.shape[0], kb.shape[3]
    st = lse.dtype
    # sum_s p * dp = sum_d o * do: the softmax row term from [t, d] instead of [t, s]
    delta = jnp.sum(o.astype(st) * do.astype(st), axis=-1)

    def q_block(carry, x):
        qi, doi, lse_i, delta_i, i = x
        q_lo = start + i * bq

        def k_block(j, carry):
            dq, dk, dv = carry
            ok = _block_allowed(q_lo, j, bq, bk, mb[j], window, _segs(seg, i, j))
            z = _scores(qi, kb[j], ok, scale, st)
            p = jnp.exp(z - lse_i[..., None])  # 0 where masked and in rows with no visible key
            dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vb[j], preferred_element_type=st)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(qb.dtype)
            dq = dq + jnp.einsum("bkgqs,bksd->bkgqd", ds, kb[j], preferred_element_type=st)
            dk = dk.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=st))
            dv = dv.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi,
                                         preferred_element_type=st))
            return dq, dk, dv

        lo, hi = _key_blocks(q_lo, bq, bk, nk, window)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, k_block,
                                       (jnp.zeros((b, kh, g, bq, d), st), *carry))
        return (dk, dv), dq

    zeros = jnp.zeros((nk, b, kh, bk, d), st)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), (qb, do, lse, delta, jnp.arange(nq)))
    # rows with no visible key averaged v uniformly: each slot gets 1/s of their do (padded
    # slots too, harmlessly: the caller's pad drops them); their q and k get no gradient
    dead = jnp.where(jnp.isinf(lse)[..., None], do.astype(st), 0.0).sum((0, 3, 4)) / s
    dv = dv + dead[None, :, :, None, :]
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------
# cudnn (GPU) and splash (TPU): kernels we cannot run on CPU; the parts of the contract they do
# not cover natively (rows with no visible key) are patched from [b, t] quantities


_TARGET = contextvars.ContextVar("prefjax_attention_target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace for `platform` ("tpu", "gpu") instead of the default backend.

    For ahead-of-time compiles on another machine's topology (a TPU fit-check on a CPU host),
    where `jax.default_backend()` is not the platform the program will run on.
    """
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _require_backend(impl: str, platform: str) -> None:
    backend = _TARGET.get() or jax.default_backend()
    if backend != platform:
        raise ValueError(f"attention impl={impl!r} needs a {platform.upper()} backend, but the "
                         f"backend is {backend!r}; use impl='blockwise' (every backend) or "
                         f"'xla' (or attention.compiling_for('{platform}') for an AOT compile)")


def no_visible_key(key_mask: Array, q_start: Array | int, t: int,
                   window: int | None = None, segment_ids: Array | None = None) -> Array:
    """bool [b, t]: query i sees no real key (from a cumulative count, no [t, s] array).

    With segment_ids (each segment a contiguous run of slots) the visible keys start no earlier
    than the first slot of the query's run.
    """
    b, s = key_mask.shape
    count = jnp.pad(jnp.cumsum(key_mask != 0, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
    slot = q_start + jnp.arange(t)
    hi = jnp.broadcast_to(jnp.clip(slot + 1, 0, s), (b, t))
    lo = jnp.zeros_like(hi) if window is None else jnp.clip(slot - window + 1, 0, s)
    lo = jnp.broadcast_to(lo, (b, t))
    if segment_ids is not None:
        idx = jnp.arange(s)
        new_run = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                          constant_values=True)
        run_start = jax.lax.cummax(jnp.where(new_run, idx, 0), axis=1)  # [b, s]
        lo = jnp.maximum(lo, jnp.take_along_axis(run_start, jnp.clip(hi - 1, 0, s - 1), 1))
    rows = jnp.arange(b)[:, None]
    return count[rows, hi] == count[rows, lo]


def _patch_no_visible_key(o, v, dead):
    """o [b, t, h, d] with rows of `dead` [b, t] replaced by the mean of v over all slots."""
    g = o.shape[2] // v.shape[2]
    vmean = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), g, axis=1)  # [b, h, d]
    return jnp.where(dead[:, :, None, None], vmean[:, None].astype(o.dtype), o)


def _cudnn(q, k, v, key_mask, q_start, window, scale, implementation: str = "cudnn", *,
           segment_ids: Array | None = None):
    """implementation="xla" runs the same call through XLA: tests of this wrapper on CPU."""
    _require_backend("cudnn", "gpu")
    if implementation == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16)
                                      or k.dtype != q.dtype or v.dtype != q.dtype):
        raise ValueError(f"attention impl='cudnn' needs q, k, v all bfloat16 or float16 (got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}); set the model's compute dtype")
    t = q.shape[1]
    # an explicit [b, 1, t, s] mask covers left padding, the q_start offset of a KV cache and
    # the window alike (cuDNN's own causal mask assumes q_start == 0 and right padding)
    # (segment ids are one more term of the same mask)
    ok = allowed(key_mask, q_start, t, window, segment_ids)[:, None]
    o = jax.nn.dot_product_attention(q, k, v, mask=ok, scale=scale,
                                     implementation=implementation)
    dead = no_visible_key(key_mask, q_start, t, window, segment_ids)
    return _patch_no_visible_key(o.astype(v.dtype), v, dead)


def _static_int(x, field: str, impl: str) -> int:
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, TypeError) as e:
        raise ValueError(f"attention impl={impl!r} needs a concrete (non-traced) {field}; it "
                         f"was traced (decoding with a KV cache under jit): use impl='blockwise' "
                         f"for decoding") from e


def _splash(q, k, v, key_mask, q_start, window, scale, block: int = 128,
            interpret: bool = False, *, segment_ids: Array | None = None):
    _require_backend("splash", "tpu")
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q.shape
    s = k.shape[1]
    offset = _static_int(q_start, "q_start", "splash")
    if t % block or s % block:
        raise ValueError(f"attention impl='splash' needs t and s multiples of {block}, got "
                         f"t={t}, s={s}; pad the batch (data.max_length) or use 'blockwise'")
    if window is None:
        head_mask = sa.CausalMask((t, s), offset=offset)
    else:  # left window - 1 slots and none to the right: slot - window < j <= slot
        head_mask = sa.LocalMask((t, s), window_size=(window - 1, 0), offset=offset)
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, head_axis = _splash_mesh_axes(mesh, b, h, k.shape[2])
    heads = h // (mesh.shape[head_axis] if head_axis else 1)  # per device
    kernel = sa.make_splash_mha_single_device(sa.MultiHeadMask([head_mask] * heads),
                                              interpret=interpret)  # interpret: tests on CPU
    run = _precision_safe(jax.vmap(kernel), q.dtype)
    if batch_axes or head_axis:  # a Pallas call is opaque to GSPMD: run it on local shards
        rows = batch_axes or None
        spec = jax.sharding.PartitionSpec(rows, head_axis, None, None)
        seg_spec = jax.sharding.PartitionSpec(rows, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec,
                                                      sa.SegmentIds(seg_spec, seg_spec)),
                            out_specs=spec, check_vma=False)
    dead = no_visible_key(key_mask, q_start, t, window, segment_ids)
    # splash segment ids: padding keys are segment 0, real keys 1 + their packed segment (1
    # without packing). Queries take their slot's, except a query with no visible real key,
    # which joins segment 0 so that its row is not empty (splash's softmax needs one visible
    # key; its own slot is padding) and is patched below.
    if segment_ids is None:
        kv_seg, q_seg = (key_mask != 0).astype(jnp.int32), jnp.ones((b, t), jnp.int32)
    else:
        kv_seg = jnp.where(key_mask != 0, segment_ids + 1, 0).astype(jnp.int32)
        q_seg = query_segments(segment_ids, offset, t).astype(jnp.int32) + 1
    seg = sa.SegmentIds(q=jnp.where(dead, 0, q_seg), kv=kv_seg)
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # splash does not scale
    o = run(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
    return _patch_no_visible_key(o.transpose(0, 2, 1, 3).astype(v.dtype), v, dead)


def _splash_mesh_axes(mesh, b: int, h: int, kh: int) -> tuple[tuple[str, ...], str | None]:
    """(mesh axes splitting the batch, axis splitting the heads or None) of the context mesh.

    Batch over prefjax's ("data", "fsdp") axes, heads over "tensor" when both head counts divide
    by it (otherwise heads stay whole on each device). Nothing without a mesh of > 1 device.
    """
    if mesh.empty or mesh.size == 1:
        return (), None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    n = math.prod(sizes[a] for a in batch)
    if b % n:
        raise ValueError(f"attention impl='splash': batch {b} does not divide over mesh axes "
                         f"{batch} ({n} shards)")
    tp = sizes.get("tensor", 1)
    return batch, ("tensor" if tp > 1 and h % tp == 0 and kh % tp == 0 else None)


def _precision_safe(kernel, dtype):
    """`kernel(q, k, v, seg)` traced, forward and backward, at the default matmul precision.

    Mosaic cannot compile fp32-precision dots of bf16 operands, which a global
    jax_default_matmul_precision="highest" would ask for; the splash backward is traced when the
    gradient is taken, so the precision is pinned inside a custom VJP around both passes.
    """
    if dtype != jnp.bfloat16:
        return kernel

    @jax.custom_vjp
    def run(q, k, v, seg):
        with jax.default_matmul_precision("default"):
            return kernel(q, k, v, seg)

    def fwd(q, k, v, seg):
        with jax.default_matmul_precision("default"):
            o, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, seg), q, k, v)
        return o, vjp

    def bwd(vjp, do):
        with jax.default_matmul_precision("default"):
            return (*vjp(do), None)

    run.defvjp(fwd, bwd)
    return run
