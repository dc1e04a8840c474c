"""Llama-family decoder (Llama incl. Llama-3 RoPE scaling, Qwen2, Mistral) in Flax NNX + HF hooks.

Parameters are float32 masters (`param_dtype`) in `[in, out]` layout with logical axis names;
compute runs in `dtype` (e.g. bf16) with RMSNorm statistics, attention softmax and logits in
float32. The four `*_hf` functions at the bottom are this family's hooks for `prefjax.models.hf`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from prefjax.models import attention
from prefjax.models import cache as kvc
from prefjax.models.cache import KVCache
from prefjax.models.linear import matmul
from prefjax.parallel import BATCH_AXES

Array = jax.Array
MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mistral": "MistralForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family decoder (hashable: it is static model structure)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "llama3"
    rope_factor: float = 8.0  # llama3 scaling parameters (unused for "default")
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral; None = full attention
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention"/"sliding_attention"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Model-structure options, not HF fields (from_hf leaves the defaults, to_hf ignores them):
    scan_layers: bool = False  # blocks stacked on a leading "layers" axis, run by one lax.scan
    remat_policy: str = "none"  # what each block saves for the backward; see REMAT_POLICIES
    attention_impl: str = "xla"  # prefjax.models.attention implementation

    def __post_init__(self):
        check_layer_options(self)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {self.rope_type!r} is not supported; prefjax implements "
                             "'default' (no scaling) and 'llama3'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers")
        windows = {self.window(i) for i in range(self.num_layers)}
        if self.scan_layers and len(windows) > 1:
            # one scanned body runs every layer, and the attention window is static structure
            raise ValueError(
                f"scan_layers=True needs the same attention window on every layer, but "
                f"layer_types mixes windows {sorted(windows, key=str)}; use scan_layers=False")

    def window(self, layer: int) -> int | None:
        """Sliding-window size of `layer` (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """From a HF config.json dict (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
        mt = d.get("model_type", "llama")
        if mt not in MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not a Llama-family type {MODEL_TYPES}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config rope type {rope_type!r} is not supported; prefjax "
                             "implements 'default' (no scaling) and 'llama3'")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        heads = d["num_attention_heads"]
        kw: dict[str, Any] = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope_type, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            initializer_range=d.get("initializer_range", 0.02), model_type=mt,
            bos_token_id=d.get("bos_token_id"), pad_token_id=d.get("pad_token_id"),
            eos_token_id=tuple(e) if isinstance(e := d.get("eos_token_id"), list) else e)
        if rope_type == "llama3":
            kw.update(rope_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                      rope_high_freq_factor=rope["high_freq_factor"],
                      rope_original_max_position_embeddings=rope.get(
                          "original_max_position_embeddings",
                          d.get("original_max_position_embeddings")))
        if mt == "llama":
            bias = bool(d.get("attention_bias", False))
            kw.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)))
        elif mt == "qwen2":
            kw.update(qkv_bias=True)
            if d.get("use_sliding_window", False) and d.get("sliding_window"):
                kw.update(sliding_window=d["sliding_window"])
                types = d.get("layer_types") or [
                    "sliding_attention" if i >= d.get("max_window_layers", 0) else "full_attention"
                    for i in range(kw["num_layers"])]
                kw.update(layer_types=tuple(types))
        else:  # mistral
            kw.update(sliding_window=d.get("sliding_window"))
        return cls(**kw)

    def to_hf(self, model_type: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers loads as `model_type` (default: self.model_type)."""
        mt = model_type or self.model_type
        if mt not in MODEL_TYPES:
            raise ValueError(f"cannot export a Llama-family config as {mt!r}; use one of "
                             f"{MODEL_TYPES}")
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        d: dict[str, Any] = dict(
            architectures=[_ARCHITECTURES[mt]], model_type=mt, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope, rope_theta=self.rope_theta,
            rope_scaling=rope if self.rope_type != "default" else None,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
            eos_token_id=list(e) if isinstance(e := self.eos_token_id, tuple) else e,
            pad_token_id=self.pad_token_id, dtype="float32")

        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"HF {mt!r} cannot represent this config: {what}")

        if mt == "llama":
            need(self.qkv_bias == self.o_bias, "llama has one attention_bias for q/k/v and o")
            need(self.sliding_window is None, "llama has no sliding window")
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif mt == "qwen2":
            need(self.qkv_bias and not self.o_bias and not self.mlp_bias,
                 "qwen2 has q/k/v biases and no o/mlp biases")
            types = self.layer_types or ("sliding_attention" if self.sliding_window else
                                         "full_attention",) * self.num_layers
            d.update(use_sliding_window=self.sliding_window is not None,
                     sliding_window=self.sliding_window, layer_types=list(types),
                     max_window_layers=types.index("sliding_attention")
                     if "sliding_attention" in types else self.num_layers)
        else:
            need(not (self.qkv_bias or self.o_bias or self.mlp_bias), "mistral has no biases")
            need(self.layer_types is None or set(self.layer_types) == {"sliding_attention"},
                 "mistral uses the sliding window on every layer")
            d.update(sliding_window=self.sliding_window)
        return d


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim / 2] float32, with Llama-3 scaling if configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_type == "llama3":
        old, f = cfg.rope_original_max_position_embeddings, cfg.rope_factor
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, blended, scaled)
    return inv.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate x [b, t, h, d] by positions [b, t] (HF's rotate-half convention)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _param(value, names) -> nnx.Param:
    # eager_sharding=False: the model builds without a mesh; placement happens through the
    # logical names (prefjax.parallel) when a train state is created under jit.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


# --- layer options shared by every decoder: remat policy, stacked and scanned blocks ------------

# Names of remat policies (config field `remat_policy`); "none" runs blocks without remat, the
# others wrap each block in jax.checkpoint with that policy. "full" is jax's default (save only
# the block's inputs) and is what the `remat=True` constructor argument means.
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "save_qkv_proj")
# checkpoint_name tags on the q/k/v projections (after RoPE), saved by "save_qkv_proj"
QKV_NAMES = ("query_proj", "key_proj", "value_proj")


def attention_impls() -> tuple[str, ...]:
    """Valid values of the `attention_impl` config field."""
    return attention.IMPLEMENTATIONS


def check_layer_options(cfg) -> None:
    """Validate a decoder config's scan_layers / remat_policy / attention_impl fields."""
    name = type(cfg).__name__
    if not isinstance(cfg.scan_layers, bool):
        raise ValueError(f"{name}.scan_layers must be a bool, got {cfg.scan_layers!r}")
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"{name}.remat_policy {cfg.remat_policy!r} is not one of "
                         f"{REMAT_POLICIES}")
    if cfg.attention_impl not in attention_impls():
        raise ValueError(f"{name}.attention_impl {cfg.attention_impl!r} is not one of "
                         f"{attention_impls()}")


def block_remat(policy: str, remat: bool) -> str:
    """The remat policy a model runs: `remat=True` (the older switch) means "full" when the
    config asks for none; an explicit config policy wins."""
    return "full" if remat and policy == "none" else policy


def checkpoint_policy(name: str):
    """The `jax.checkpoint` policy of a REMAT_POLICIES name other than "none"."""
    cp = jax.checkpoint_policies
    return {"full": None, "nothing_saveable": cp.nothing_saveable,
            "dots_saveable": cp.dots_saveable,
            "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
            "save_qkv_proj": cp.save_only_these_names(*QKV_NAMES)}[name]


def stack_blocks(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`make(rngs)` built `n` times as one module whose variables have a leading axis [n, ...]
    (logical name "layers"); each layer draws from its own split of the rng streams."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def remat_block(run, policy: str):
    """`run(block, x, a)` with the block rematerialized under `policy` (a REMAT_POLICIES name).

    jax.checkpoint of a pure function of the block's split state rather than nnx.remat: it
    never writes back into the block's Variables, so it also runs when they were created at
    another trace level (a model merged inside jit and used under grad, the sampler's loop).
    """
    if policy == "none":
        return run

    def call(block, x, a):
        graphdef, state = nnx.split(block)
        pure = lambda s, h, b: run(nnx.merge(graphdef, s), h, b)  # noqa: E731
        return jax.checkpoint(pure, policy=checkpoint_policy(policy))(state, x, a)

    return call


def row_sharded(x: Array) -> Array:
    """`x` [b, ...] constrained to rows split over the mesh's batch axes (a no-op off a mesh,
    or when the rows do not divide).

    Without it GSPMD follows the fsdp-sharded embedding table into the activations: every
    device then holds all rows with the model dimension split (the TPU fit-check of a
    Llama-3-8B DPO step on v5e-32 needed 28 GiB of temporaries per chip, 11 GiB with this).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n == 1 or x.shape[0] % n:
        return x
    spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def scan_cached_blocks(layers: nnx.Module, x: Array, run, kv: tuple, xs: Any = None):
    """`(x, kv)`: a cached forward (decoding) through the layers of `stack_blocks` output, one
    `lax.scan` carrying the stacked cache `kv = (k, v)`: `x, kv = run(block_i, x, xs[i], i, kv)`.

    Carried rather than scanned over: as scan inputs and outputs the cache's layers were copied
    in and stacked out again on every call, i.e. every decode step (`cache.write_layer`).
    """
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]

    def body(carry, per_layer):
        h, kv = carry
        s, xi, i = per_layer
        h, kv = run(nnx.merge(graphdef, s), row_sharded(h), xi, i, kv)
        return (row_sharded(h), kv), None

    (x, kv), _ = jax.lax.scan(body, (x, kv), (state, xs, jnp.arange(n, dtype=jnp.int32)))
    return x, kv


def scan_blocks(layers: nnx.Module, x: Array, run, xs: Any = None, *, policy: str = "none"):
    """`(x, ys)`: for each layer i of `stack_blocks` output, `x, y_i = run(block_i, x, xs[i])`.

    One `lax.scan` over the stacked variables, so the traced program holds one block whatever
    the depth. A pure function of the split state (no nnx transform at call time): it runs
    under grad, jit and the sampler's while_loop alike. The block is rematerialized with
    `policy` (a REMAT_POLICIES name).
    """
    graphdef, state = nnx.split(layers)

    def body(h, per_layer):
        s, xi = per_layer
        h, y = run(nnx.merge(graphdef, s), row_sharded(h), xi)
        return row_sharded(h), y

    if policy != "none":
        body = jax.checkpoint(body, policy=checkpoint_policy(policy), prevent_cse=False)
    return jax.lax.scan(body, x, (state, xs))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical names `names`."""

    def __init__(self, din: int, dout: int, names: tuple[str, str], *, bias: bool,
                 rngs: nnx.Rngs, dtype, param_dtype, std: float):
        init = nnx.initializers.normal(std)
        self.kernel = _param(init(rngs.params(), (din, dout), param_dtype), names)
        self.bias = _param(jnp.zeros((dout,), param_dtype), names[1:]) if bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = matmul(x, self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale with the statistics in float32 (as HF), output in x's dtype."""

    def __init__(self, d: int, eps: float, *, param_dtype):
        self.scale = _param(jnp.ones((d,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Context(NamedTuple):
    """What every block's attention reads besides its input (from `kvc.forward_context`)."""

    positions: Array  # [b, t] RoPE / learned positions of the new tokens
    key_mask: Array  # [b, s] 1 where a key slot holds a real token (s = t, or max_len)
    start: Array | int  # key slot of query 0: 0 without a cache, cache.index with one
    index: Array | None  # cache write slot (None without a cache)
    segments: Array | None = None  # [b, s] packed rows: attention stays inside each segment


def packed_context(input_ids: Array, attention_mask: Array | None, positions: Array | None,
                   cache: KVCache | None, segment_ids: Array | None):
    """(attention_mask, positions) of a forward, filled in from `segment_ids` for packed rows.

    Packed rows (several sequences per row, `prefjax.data.packing`) take their positions per
    segment (RoPE / learned positions restart at 0 for every sequence) and their mask from
    segment_ids != 0 unless given. Shared by every decoder.
    """
    if segment_ids is None:
        return attention_mask, positions
    if cache is not None:
        raise ValueError("segment_ids (packed rows) are for training and scoring forwards; "
                         "decoding with a KV cache takes unpacked rows")
    if segment_ids.shape != input_ids.shape:
        raise ValueError(f"segment_ids must be [b, t] = {input_ids.shape} like input_ids, got "
                         f"{segment_ids.shape}")
    if attention_mask is None:
        attention_mask = (segment_ids != 0).astype(jnp.int32)
    if positions is None:
        positions = attention.segment_positions(segment_ids)
    return attention_mask, positions


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, **kw):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q = Dense(d, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o = Dense(cfg.num_heads * hd, d, ("heads", "embed"), bias=cfg.o_bias, **kw)
        self.config, self.head_dim = cfg, hd

    def __call__(self, x, ctx: Context, kv, window: int | None):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, -1, self.head_dim)  # noqa: E731
        inv_freq = rope_inv_freq(self.config)  # numpy at trace time: a compile-time constant
        q = checkpoint_name(apply_rope(split(self.q(x)), ctx.positions, inv_freq), QKV_NAMES[0])
        k = checkpoint_name(apply_rope(split(self.k(x)), ctx.positions, inv_freq), QKV_NAMES[1])
        v = checkpoint_name(split(self.v(x)), QKV_NAMES[2])
        scale, impl = self.head_dim ** -0.5, self.config.attention_impl
        if kv is not None:  # attend over the whole cache buffer with the new tokens written in
            kv, k, v = kvc.write_layer(kv, k, v, ctx.index)
            a = attention.attend_cached(q, k, v, key_mask=ctx.key_mask, q_start=ctx.start,
                                        window=window, scale=scale, impl=impl)
            return self.o(a.reshape(b, t, -1)), kv
        a = attention.attend(q, k, v, key_mask=ctx.key_mask, q_start=ctx.start, window=window,
                             scale=scale, impl=impl, segment_ids=ctx.segments)
        return self.o(a.reshape(b, t, -1)), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = Dense(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
        self.up = Dense(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
        self.down = Dense(f, d, ("mlp", "embed"), bias=cfg.mlp_bias, **kw)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, **kw):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=kw["param_dtype"])
        self.attn = Attention(cfg, **kw)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=kw["param_dtype"])
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, ctx: Context, kv, window: int | None):
        a, kv = self.attn(self.attn_norm(x), ctx, kv, window)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class Embed(nnx.Module):
    """Token embedding table [v, d]."""

    def __init__(self, v: int, d: int, *, rngs: nnx.Rngs, param_dtype, std: float):
        init = nnx.initializers.normal(std)
        self.embedding = _param(init(rngs.params(), (v, d), param_dtype), ("vocab", "embed"))


class Llama(nnx.Module):
    """Llama / Qwen2 / Mistral decoder following the prefjax model interface contract.

    `config.scan_layers`: `layers` is one Block whose parameters carry a leading [num_layers]
    axis (paths `("layers", "attn", "q", "kernel")`, ...), run by one lax.scan; otherwise an
    nnx.List of Blocks (paths `("layers", i, "attn", ...)`). `remat=True` is the older switch
    for `config.remat_policy="full"`.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False):
        self.config, self.dtype, self.remat = config, dtype, remat
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=config.initializer_range)
        c = config
        self.embed = Embed(c.vocab_size, c.hidden_size, rngs=rngs, param_dtype=param_dtype,
                           std=c.initializer_range)
        if c.scan_layers:
            self.layers = stack_blocks(lambda r: Block(c, **{**kw, "rngs": r}), c.num_layers,
                                       rngs)
        else:
            self.layers = nnx.List([Block(c, **kw) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if c.tie_word_embeddings else Dense(
            c.hidden_size, c.vocab_size, ("embed", "vocab"), bias=False, **kw)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, *,
                      positions: Array | None = None, cache: KVCache | None = None,
                      segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """Final-normed hidden states [b, t, d] (compute dtype) and the updated cache (or None).

        segment_ids int [b, t] (packed rows, no cache): 0 on padding, one id per sequence; no
        attention crosses segments and positions restart per segment unless given.
        """
        c = self.config
        b, t = input_ids.shape
        attention_mask, positions = packed_context(input_ids, attention_mask, positions, cache,
                                                   segment_ids)
        _, key_mask, pos, start, index = kvc.forward_context(attention_mask, (b, t), cache,
                                                             positions)
        ctx = Context(pos, key_mask, start, index, segment_ids)
        # remat only saves activation memory for a backward pass; decoding with a cache has none
        policy = block_remat(c.remat_policy, self.remat) if cache is None else "none"
        x = row_sharded(jnp.take(self.embed.embedding[...], input_ids, axis=0).astype(self.dtype))
        if c.scan_layers:
            window = c.window(0)  # the same on every layer (checked by LlamaConfig)
            if cache is not None:
                def step(block, h, _, i, kv):
                    return block(h, ctx, (*kv, i), window)

                x, kv = scan_cached_blocks(self.layers, x, step, (cache.k, cache.v))
                return self.norm(x), KVCache(*kv, key_mask, cache.index + t)

            def run(block, h, _):
                return block(h, ctx, None, window)[0], None

            x, _ = scan_blocks(self.layers, x, run, policy=policy)
            return self.norm(x), None
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = remat_block(_block_fn(ctx, c.window(i)), policy)(block, x, kv)
            x = row_sharded(x)
            ks.append(k)
            vs.append(v)
        if cache is not None:
            cache = KVCache(tuple(ks), tuple(vs), key_mask, cache.index + t)
        return self.norm(x), cache

    def unembed(self) -> Array:
        """Output projection [d, v] in the compute dtype (lm_head kernel or tied embedding.T)."""
        w = self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return w.astype(self.dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, cache: KVCache | None = None,
                 segment_ids: Array | None = None):
        """Logits float32 [b, t, v]; `(logits, new_cache)` when `cache` is given.

        Logits are `hidden_states @ unembed()` accumulated in float32 (identical to
        `(h @ unembed()).astype(float32)` for float32 compute; for bf16 compute it skips the
        rounding of the product to bf16).
        """
        h, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                          cache=cache, segment_ids=segment_ids)
        logits = jnp.matmul(h, self.unembed(), preferred_element_type=jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        return KVCache.init(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim,
                            dtype or self.dtype, stacked=c.scan_layers)


def _block_fn(ctx: Context, window: int | None):
    return lambda block, x, kv: block(x, ctx, kv, window)


# --- hooks for prefjax.models.hf (model_type "llama", "qwen2", "mistral") -----------------------

# Tensors a checkpoint may carry that we do not need: old rotary buffers, and lm_head.weight
# when the embedding is tied (then it is a copy of embed_tokens and is never expected).
HF_IGNORE = (r"(^|\.)rotary_emb\.inv_freq$", r"^lm_head\.weight$")


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig.from_hf(d)


def build(config: LlamaConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
          remat: bool = False) -> Llama:
    return Llama(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)


def hf_layout(cfg: LlamaConfig) -> list[tuple[str, tuple, bool, int | None]]:
    """(HF tensor name, path in nnx.state(model, nnx.Param), transposed?, layer) per tensor.

    HF stores Linear weights as [out, in]; prefjax kernels are [in, out]. Unscanned blocks sit at
    ("layers", i, ...) (layer None); with `scan_layers` every block leaf is one array at
    ("layers", ...) whose slice `layer` is that layer's tensor.
    """
    out = [("model.embed_tokens.weight", ("embed", "embedding"), False, None),
           ("model.norm.weight", ("norm", "scale"), False, None)]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), True, None))
    dense = (("self_attn.q_proj", ("attn", "q"), cfg.qkv_bias),
             ("self_attn.k_proj", ("attn", "k"), cfg.qkv_bias),
             ("self_attn.v_proj", ("attn", "v"), cfg.qkv_bias),
             ("self_attn.o_proj", ("attn", "o"), cfg.o_bias),
             ("mlp.gate_proj", ("mlp", "gate"), cfg.mlp_bias),
             ("mlp.up_proj", ("mlp", "up"), cfg.mlp_bias),
             ("mlp.down_proj", ("mlp", "down"), cfg.mlp_bias))
    scan = getattr(cfg, "scan_layers", False)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q, layer = (("layers",), i) if scan else (("layers", i), None)
        for hf, ours, bias in dense:
            out.append((f"{p}{hf}.weight", (*q, *ours, "kernel"), True, layer))
            if bias:
                out.append((f"{p}{hf}.bias", (*q, *ours, "bias"), False, layer))
        out.append((p + "input_layernorm.weight", (*q, "attn_norm", "scale"), False, layer))
        out.append((p + "post_attention_layernorm.weight", (*q, "mlp_norm", "scale"), False,
                    layer))
    return out


_layout = hf_layout  # the name the hooks had before


def params_from_hf(tensors: dict[str, np.ndarray], config: LlamaConfig) -> dict:
    """HF tensors (all expected names present, shapes checked by the caller) -> nested params."""
    from prefjax.models import hf

    return hf.params_from_tensors(hf_layout(config), tensors)


def params_to_hf(model_or_state: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
    """A Llama, its nnx.State of params, or the nested pure dict -> HF tensor dict (numpy views
    of host arrays; stacked layers are sliced)."""
    from prefjax.models import hf

    return hf.tensors_from_params(hf_layout(config), pure_params(model_or_state))


def pure_params(model_or_state: Any) -> dict:
    """The nested plain dict of parameter arrays of a module, an nnx.State or a plain dict."""
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param).to_pure_dict()
    if isinstance(model_or_state, nnx.State):
        return model_or_state.to_pure_dict()
    return model_or_state
