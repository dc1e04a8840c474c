"""GPT-2 decoder in Flax NNX (learned positions, pre-LayerNorm, GELU MLP, tied head) + HF hooks.

Parameters are `param_dtype` masters in `[in, out]` layout with logical axis names; compute runs
in `dtype` with LayerNorm statistics, attention softmax and logits in float32.

HF fuses q/k/v into one Conv1D `c_attn` ([d, 3d]). Here they are three separate kernels
`attn.q/k/v` (`('embed', 'heads')`), split on load and concatenated on save: a fused kernel
sharded over 'heads' would cut across the q|k|v boundary instead of across heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from prefjax.models import attention
from prefjax.models import cache as kvc
from prefjax.models.cache import KVCache
from prefjax.models.llama import (
    QKV_NAMES,
    Context,
    Dense,
    block_remat,
    check_layer_options,
    packed_context,
    remat_block,
    row_sharded,
    scan_blocks,
    scan_cached_blocks,
    stack_blocks,
)

Array = jax.Array
_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 decoder (hashable: it is static model structure)."""

    vocab_size: int
    hidden_size: int  # HF n_embd
    num_layers: int  # n_layer
    num_heads: int  # n_head
    intermediate_size: int | None = None  # n_inner; None: 4 * hidden_size
    max_position_embeddings: int = 1024  # n_positions
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    model_type: str = "gpt2"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Model-structure options, not HF fields (from_hf leaves the defaults, to_hf ignores them):
    scan_layers: bool = False  # blocks stacked on a leading "layers" axis, run by one lax.scan
    remat_policy: str = "none"  # what each block saves for the backward; llama.REMAT_POLICIES
    attention_impl: str = "xla"  # prefjax.models.attention implementation

    def __post_init__(self):
        check_layer_options(self)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size (n_embd)={self.hidden_size} is not a multiple of "
                             f"num_heads (n_head)={self.num_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation!r} is not supported; use one "
                             f"of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        """From a HF GPT-2 config.json dict."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type {d['model_type']!r} is not 'gpt2'")
        if d.get("add_cross_attention", False):
            raise ValueError("add_cross_attention=True (encoder-decoder GPT-2) is not supported")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["n_embd"], num_layers=d["n_layer"],
                   num_heads=d["n_head"], intermediate_size=d.get("n_inner"),
                   max_position_embeddings=d.get("n_positions", 1024),
                   layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                   activation=d.get("activation_function", "gelu_new"),
                   scale_attn_weights=bool(d.get("scale_attn_weights", True)),
                   scale_attn_by_inverse_layer_idx=bool(
                       d.get("scale_attn_by_inverse_layer_idx", False)),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                   initializer_range=d.get("initializer_range", 0.02),
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                   pad_token_id=d.get("pad_token_id"))

    def to_hf(self, model_type: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers loads as GPT2LMHeadModel."""
        if (model_type or "gpt2") != "gpt2":
            raise ValueError(f"cannot export a GPT-2 config as {model_type!r}")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                    vocab_size=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_layers,
                    n_head=self.num_heads, n_inner=self.intermediate_size,
                    n_positions=self.max_position_embeddings,
                    layer_norm_epsilon=self.layer_norm_eps, activation_function=self.activation,
                    scale_attn_weights=self.scale_attn_weights,
                    scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
                    tie_word_embeddings=self.tie_word_embeddings,
                    initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    dtype="float32")


def _param(value, names) -> nnx.Param:
    # Built without a mesh; placement follows the logical names (prefjax.parallel) later.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias with float32 statistics, output in x's dtype."""

    def __init__(self, d: int, eps: float, *, param_dtype):
        self.scale = _param(jnp.ones((d,), param_dtype), ("norm",))
        self.bias = _param(jnp.zeros((d,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, **kw):
        d = cfg.hidden_size
        self.q = Dense(d, d, ("embed", "heads"), bias=True, **kw)
        self.k = Dense(d, d, ("embed", "heads"), bias=True, **kw)
        self.v = Dense(d, d, ("embed", "heads"), bias=True, **kw)
        self.o = Dense(d, d, ("heads", "embed"), bias=True, **kw)
        self.head_dim, self.impl = cfg.head_dim, cfg.attention_impl
        scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def __call__(self, x, ctx: Context, kv, q_scale: Array | None = None):
        """`q_scale` (a traced scalar): the per-layer factor of scale_attn_by_inverse_layer_idx
        when the layers are scanned (one body, so `self.scale` cannot vary by layer)."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, -1, self.head_dim)  # noqa: E731
        q, k, v = (checkpoint_name(split(p(x)), n)
                   for p, n in zip((self.q, self.k, self.v), QKV_NAMES, strict=True))
        if q_scale is not None:
            q = q * q_scale.astype(q.dtype)
        if kv is not None:  # attend over the whole cache buffer with the new tokens written in
            kv, k, v = kvc.write_layer(kv, k, v, ctx.index)
            a = attention.attend_cached(q, k, v, key_mask=ctx.key_mask, q_start=ctx.start,
                                        scale=self.scale, impl=self.impl)
            return self.o(a.reshape(b, t, -1)), kv
        a = attention.attend(q, k, v, key_mask=ctx.key_mask, q_start=ctx.start,
                             scale=self.scale, impl=self.impl, segment_ids=ctx.segments)
        return self.o(a.reshape(b, t, -1)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc = Dense(d, f, ("embed", "mlp"), bias=True, **kw)
        self.proj = Dense(f, d, ("mlp", "embed"), bias=True, **kw)
        self.tanh = _ACTIVATIONS[cfg.activation]

    def __call__(self, x):
        return self.proj(jax.nn.gelu(self.fc(x), approximate=self.tanh))


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, **kw):
        eps, pd = cfg.layer_norm_eps, kw["param_dtype"]
        self.ln_1 = LayerNorm(cfg.hidden_size, eps, param_dtype=pd)
        self.attn = Attention(cfg, layer, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps, param_dtype=pd)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, ctx: Context, kv, q_scale: Array | None = None):
        a, kv = self.attn(self.ln_1(x), ctx, kv, q_scale)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


def _block_fn(ctx: Context):
    return lambda block, x, kv: block(x, ctx, kv)


class GPT2(nnx.Module):
    """GPT-2 decoder following the prefjax model interface contract.

    `config.scan_layers`: `layers` is one Block whose parameters carry a leading [num_layers]
    axis (paths `("layers", "attn", "q", "kernel")`, ...), run by one lax.scan; otherwise an
    nnx.List of Blocks (paths `("layers", i, "attn", ...)`). `remat=True` is the older switch
    for `config.remat_policy="full"`.
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False):
        c = config
        self.config, self.dtype, self.remat = c, dtype, remat
        init = nnx.initializers.normal(c.initializer_range)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=c.initializer_range)
        self.wte = _param(init(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype),
                          ("vocab", "embed"))
        self.wpe = _param(init(rngs.params(), (c.max_position_embeddings, c.hidden_size),
                               param_dtype), ("pos", "embed"))
        if c.scan_layers:  # built with layer 0's scale; the others get theirs as scanned data
            self.layers = stack_blocks(lambda r: Block(c, 0, **{**kw, "rngs": r}),
                                       c.num_layers, rngs)
        else:
            self.layers = nnx.List([Block(c, i, **kw) for i in range(c.num_layers)])
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if c.tie_word_embeddings else Dense(
            c.hidden_size, c.vocab_size, ("embed", "vocab"), bias=False, **kw)

    def _check_positions(self, t: int, positions: Array | None) -> None:
        n = self.config.max_position_embeddings
        if t > n:  # mask-derived positions reach t - 1
            raise ValueError(f"GPT-2 input has {t} tokens but the model has only n_positions={n} "
                             "learned positions; truncate the sequence")
        if positions is None:
            return
        try:
            hi = int(jnp.max(positions))
        except (jax.errors.ConcretizationTypeError, TypeError):
            return  # traced under jit: cannot check here
        if hi >= n:
            raise ValueError(f"GPT-2 position {hi} is beyond n_positions={n} (positions must "
                             f"be < {n})")

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, *,
                      positions: Array | None = None, cache: KVCache | None = None,
                      segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """Final-LayerNormed hidden states [b, t, d] (compute dtype) and the cache (or None).

        Positions past n_positions raise when they are concrete (no jit, or t > n_positions);
        under jit explicit positions are not checked and the embedding gather would clamp.
        segment_ids: packed rows, as `Llama.hidden_states` (learned positions per segment).
        """
        c = self.config
        b, t = input_ids.shape
        self._check_positions(t, positions)
        attention_mask, positions = packed_context(input_ids, attention_mask, positions, cache,
                                                   segment_ids)
        _, key_mask, pos, start, index = kvc.forward_context(attention_mask, (b, t), cache,
                                                             positions)
        ctx = Context(pos, key_mask, start, index, segment_ids)
        # remat only saves activation memory for a backward pass; decoding with a cache has none
        policy = block_remat(c.remat_policy, self.remat) if cache is None else "none"
        x = jnp.take(self.wte[...], input_ids, axis=0) + jnp.take(self.wpe[...], pos, axis=0)
        x = row_sharded(x.astype(self.dtype))
        if c.scan_layers:
            # layer i's scores are scaled 1 / (i + 1) more than layer 0's (the stacked scale)
            q_scale = (1.0 / jnp.arange(1, c.num_layers + 1, dtype=jnp.float32)
                       if c.scale_attn_by_inverse_layer_idx else None)

            if cache is not None:
                def step(block, h, qs, i, kv):
                    return block(h, ctx, (*kv, i), qs)

                x, kv = scan_cached_blocks(self.layers, x, step, (cache.k, cache.v), q_scale)
                return self.ln_f(x), KVCache(*kv, key_mask, cache.index + t)

            def run(block, h, qs):
                return block(h, ctx, None, qs)[0], None

            x, _ = scan_blocks(self.layers, x, run, q_scale, policy=policy)
            return self.ln_f(x), None
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = remat_block(_block_fn(ctx), policy)(block, x, kv)
            x = row_sharded(x)
            ks.append(k)
            vs.append(v)
        if cache is not None:
            cache = KVCache(tuple(ks), tuple(vs), key_mask, cache.index + t)
        return self.ln_f(x), cache

    def unembed(self) -> Array:
        """Output projection [d, v] in the compute dtype (tied wte.T, or the lm_head kernel)."""
        w = self.wte[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return w.astype(self.dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, cache: KVCache | None = None,
                 segment_ids: Array | None = None):
        """Logits float32 [b, t, v] = hidden_states @ unembed(); `(logits, cache)` with a cache."""
        h, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                          cache=cache, segment_ids=segment_ids)
        logits = jnp.matmul(h, self.unembed(), preferred_element_type=jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"init_cache(max_len={max_len}) exceeds GPT-2's "
                             f"n_positions={c.max_position_embeddings}")
        return KVCache.init(c.num_layers, batch, max_len, c.num_heads, c.head_dim,
                            dtype or self.dtype, stacked=c.scan_layers)


# --- hooks for prefjax.models.hf (model_type "gpt2") ---------------------------------------------

# attn.bias / attn.masked_bias: causal-mask buffers of older checkpoints; lm_head.weight: a copy
# of wte when tied.
HF_IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$", r"^lm_head\.weight$")


def config_from_hf(d: dict[str, Any]) -> GPT2Config:
    return GPT2Config.from_hf(d)


def build(config: GPT2Config, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
          remat: bool = False) -> GPT2:
    return GPT2(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)


def hf_layout(cfg: GPT2Config) -> list[tuple]:
    """(HF tensor name, path in nnx.state(model, nnx.Param), transposed?, layer[, cols]).

    HF's Conv1D weights are already [in, out], so nothing is transposed except lm_head. The
    fused c_attn weight [d, 3d] / bias [3d] holds q | k | v in its columns (`cols`). Unscanned
    blocks sit at ("layers", i, ...); with `scan_layers` at ("layers", ...), slice `layer`.
    """
    out = [("transformer.wte.weight", ("wte",), False, None),
           ("transformer.wpe.weight", ("wpe",), False, None),
           ("transformer.ln_f.weight", ("ln_f", "scale"), False, None),
           ("transformer.ln_f.bias", ("ln_f", "bias"), False, None)]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), True, None))
    d, scan = cfg.hidden_size, getattr(cfg, "scan_layers", False)
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        q, layer = (("layers",), i) if scan else (("layers", i), None)
        for ln in ("ln_1", "ln_2"):
            out += [(f"{p}{ln}.weight", (*q, ln, "scale"), False, layer),
                    (f"{p}{ln}.bias", (*q, ln, "bias"), False, layer)]
        for j, part in enumerate("qkv"):
            cols = (j * d, (j + 1) * d)
            out += [(f"{p}attn.c_attn.weight", (*q, "attn", part, "kernel"), False, layer, cols),
                    (f"{p}attn.c_attn.bias", (*q, "attn", part, "bias"), False, layer, cols)]
        for hf, ours in (("attn.c_proj", ("attn", "o")), ("mlp.c_fc", ("mlp", "fc")),
                         ("mlp.c_proj", ("mlp", "proj"))):
            out += [(f"{p}{hf}.weight", (*q, *ours, "kernel"), False, layer),
                    (f"{p}{hf}.bias", (*q, *ours, "bias"), False, layer)]
    return out


_layout = hf_layout  # the name the hooks had before


def params_from_hf(tensors: dict[str, np.ndarray], config: GPT2Config) -> dict:
    """HF tensors (names and shapes checked by the caller) -> nested params dict."""
    from prefjax.models import hf

    return hf.params_from_tensors(hf_layout(config), tensors)


def params_to_hf(model_or_state: Any, config: GPT2Config) -> dict[str, np.ndarray]:
    """A GPT2, its nnx.State of params, or the nested pure dict -> HF tensor dict (numpy)."""
    from prefjax.models import hf

    pure = model_or_state
    if isinstance(pure, nnx.Module):
        pure = nnx.state(pure, nnx.Param)
    if isinstance(pure, nnx.State):
        pure = pure.to_pure_dict()
    return hf.tensors_from_params(hf_layout(config), pure)
