"""LoRA adapters on a decoder's projections: y = x W (+ b) + (alpha / r) x A B, W frozen.

`add_adapters(model, spec, rngs)` replaces the chosen `Dense` layers of a Llama / GPT-2 (stacked
by `scan_layers` or not; inside a reward or value wrapper too) with `LoRADense`, which keeps the
base `kernel` / `bias` Variables at their paths (so HF layouts, shardings and checkpoints of the
base are unchanged) and adds `lora_a` [in, r] and `lora_b` [r, out] (with a leading [layers]
axis when stacked) as `LoRAParam`s. B starts at zero, so the adapted model starts equal to the
base. Only `LoRAParam`s are trainable (`TRAINABLE`); `adapters_off(model)` is the base itself
(the reference of a LoRA run, no second copy of the weights) and `merge_adapters(model)` the
model with W + (alpha / r) A B folded in (what an HF export writes).

Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3);
rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax.models.linear import matmul
from prefjax.models.llama import Dense

Array = jax.Array

# Dense attribute names of the projections, per decoder (attention, then MLP)
PROJECTIONS = {"llama": ("q", "k", "v", "o", "gate", "up", "down"),
               "gpt2": ("q", "k", "v", "o", "fc", "proj")}
ALL = "all"


class LoRAParam(nnx.Param):
    """An adapter matrix: the only parameters a LoRA run trains and checkpoints."""


# what a LoRA run trains: the adapters, and a reward / value head when the model has one
TRAINABLE = nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("head"),
                                                           nnx.PathContains("value_head"))))
# the frozen base inside `state.rest` of a LoRA run (left out of checkpoints, rebuilt on resume)
FROZEN_BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which projections get adapters and how they are scaled.

    rank: r of A [in, r] and B [r, out]. alpha: the delta is scaled by alpha / r (rsLoRA:
    alpha / sqrt(r)). targets: Dense attribute names inside the decoder blocks (llama: q, k, v,
    o, gate, up, down; gpt2: q, k, v, o, fc, proj) or ("all",) for every one of them.
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = (ALL,)
    rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("lora.targets is empty; name projections (e.g. 'q,v') or 'all'")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, section) -> LoRASpec | None:
        """From a config's `lora` section (None when `lora.rank` is 0: LoRA off)."""
        if section is None or section.rank == 0:
            return None
        targets = tuple(t.strip() for t in section.targets.split(",") if t.strip())
        return cls(rank=section.rank, alpha=float(section.alpha), targets=targets,
                   rslora=bool(section.rslora))


class LoRADense(Dense):
    """A `Dense` whose output adds `scale * x @ lora_a @ lora_b` while `enabled`.

    The base Variables are the wrapped layer's own (same objects: no copy). `enabled` is static
    structure: a module with adapters off compiles to the plain base forward.
    """

    def __init__(self, base: Dense, *, rank: int, scale: float, rngs: nnx.Rngs):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        w = base.kernel
        *lead, din, dout = w.shape  # lead: [layers] when the blocks are stacked
        names = w.get_metadata().get("out_sharding") or (None,) * w.ndim
        lead_names, (in_name, out_name) = tuple(names[:-2]), tuple(names[-2:])
        # A as PEFT / torch.nn.Linear (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(din)
        a = jax.random.uniform(rngs.params(), (*lead, din, rank), w.dtype, -bound, bound)
        self.lora_a = LoRAParam(a, out_sharding=(*lead_names, in_name, None),
                                eager_sharding=False)
        self.lora_b = LoRAParam(jnp.zeros((*lead, rank, dout), w.dtype),
                                out_sharding=(*lead_names, None, out_name), eager_sharding=False)
        self.scale, self.enabled = float(scale), True

    def delta(self) -> Array:
        """scale * A @ B [..., in, out] in the parameters' dtype (what merging adds to W)."""
        return self.scale * jnp.matmul(self.lora_a[...], self.lora_b[...])

    def __call__(self, x: Array) -> Array:
        y = super().__call__(x)
        if not self.enabled:
            return y
        a, b = (p[...].astype(self.dtype) for p in (self.lora_a, self.lora_b))
        return y + matmul(matmul(x, a), b) * jnp.asarray(self.scale, self.dtype)


class MergedDense(Dense):
    """A plain `Dense` holding a `LoRADense`'s merged kernel W + scale A B (and its bias)."""

    def __init__(self, lora: LoRADense):
        self.kernel = lora.kernel.replace(lora.kernel[...] + lora.delta())
        self.bias, self.dtype = lora.bias, lora.dtype


def _decoder_configs(model: nnx.Module) -> list:
    return [n.config for _, n in nnx.iter_graph(model)
            if isinstance(n, nnx.Module) and hasattr(n, "config")
            and hasattr(n.config, "model_type")]


def _targets(model: nnx.Module, spec: LoRASpec) -> set[str]:
    archs = {("gpt2" if c.model_type == "gpt2" else "llama") for c in _decoder_configs(model)}
    if not archs:
        raise ValueError(f"add_adapters needs a prefjax decoder (Llama / GPT2), got "
                         f"{type(model).__name__}")
    known = set().union(*(PROJECTIONS[a] for a in archs))
    if ALL in spec.targets:
        return known
    unknown = sorted(set(spec.targets) - known)
    if unknown:
        raise ValueError(f"lora.targets {unknown} name no projection of this model; it has "
                         f"{sorted(known)} (or 'all')")
    return set(spec.targets)


def _set(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _node(model, path):
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def view(model: nnx.Module) -> nnx.Module:
    """A new module object over the same arrays (nothing copied), safe to restructure."""
    return nnx.merge(*nnx.split(model))


def _replace(model: nnx.Module, pick, make) -> nnx.Module:
    found = [(p, n) for p, n in nnx.iter_graph(model) if pick(p, n)]
    for path, node in found:
        _set(_node(model, path[:-1]), path[-1], make(node))
    return model


def add_adapters(model: nnx.Module, spec: LoRASpec, rngs: nnx.Rngs) -> nnx.Module:
    """A view of `model` (its arrays shared, `model` itself untouched) with LoRA on the
    projections `spec.targets` of its decoder blocks (paths under "layers")."""
    targets = _targets(model, spec)

    def pick(path, node):
        return (type(node) is Dense and "layers" in path and path[-1] in targets)

    out = _replace(view(model), pick, lambda d: LoRADense(d, rank=spec.rank, scale=spec.scale,
                                                          rngs=rngs))
    if not has_adapters(out):
        raise ValueError(f"lora.targets {spec.targets} matched no projection")
    return out


def adapters(model: nnx.Module) -> list[tuple[tuple, LoRADense]]:
    """`(path, layer)` of every LoRADense in `model`."""
    return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRADense)]


def has_adapters(model: nnx.Module) -> bool:
    return bool(adapters(model))


def set_adapters(model: nnx.Module, enabled: bool) -> nnx.Module:
    """Switch every adapter of `model` on or off in place; returns `model`."""
    for _, layer in adapters(model):
        layer.enabled = enabled
    return model


def adapters_off(model: nnx.Module) -> nnx.Module:
    """The base model: a view of `model` (same arrays) whose adapters are switched off."""
    return set_adapters(view(model), False)


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """A view of `model` with every LoRADense replaced by its merged plain Dense (W + scale A B);
    the base kernels of `model` are not modified. A model without adapters comes back as is."""
    if not has_adapters(model):
        return model
    return _replace(view(model), lambda p, n: isinstance(n, LoRADense), MergedDense)


def adapter_state(model: nnx.Module) -> nnx.State:
    """The `LoRAParam`s of `model` (what a LoRA checkpoint and a PEFT folder hold)."""
    return nnx.state(model, LoRAParam)
