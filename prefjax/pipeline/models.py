"""Models of a run: the trained model's state (with the record's head, or a live reference
inside it), the frozen reference, and their placement on the mesh.

The state's initial value is built lazily: `fit` calls `init_state` only when the workdir has no
checkpoint, and restores into `abstract` (shapes, dtypes and shardings) otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from prefjax.lm import policy_out
from prefjax.losses.records import Algorithm
from prefjax.models import lora
from prefjax.parallel import param_shardings
from prefjax.train import build
from prefjax.train.reference import POLICY_PARAMS, WithReference, live_reference_forward
from prefjax.train.state import (
    FROZEN_REFERENCE,
    TrainState,
    abstract_state_for,
    create_train_state,
    place_frozen,
    state_from_module,
    state_shardings,
)

FROZEN_DTYPES = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Trainee:
    """The trained model as the loop needs it.

    abstract: TrainState of shapes (the restore target); shardings: its NamedShardings;
    init_state: `() -> TrainState`, the fresh state (built only when called); forward: what the
    step runs on the model (`prefjax.train.step.Forward`).
    """

    abstract: TrainState
    shardings: TrainState
    init_state: Callable[[], TrainState]
    forward: Callable
    frozen: object = None  # nnx filter over state.rest that checkpoints leave out
    frozen_rest: Callable | None = None  # `() -> that part`, rebuilt on resume


def frozen(module: nnx.Module, c: ConfigDict, *, mesh, rules) -> nnx.Module:
    """`module` with its state cast to `reference.param_dtype` (when set) and placed on `mesh`
    by `rules` (a frozen model: the reference or a reward model)."""
    dtype = FROZEN_DTYPES[_param_dtype(c)]
    graphdef, st = nnx.split(module)
    if dtype is not None:
        st = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                          else x, st)
    st = jax.device_put(st, param_shardings(st, mesh, rules))
    return nnx.merge(graphdef, st)


def _param_dtype(c: ConfigDict) -> str:
    dtype = c.reference.get("param_dtype", "")
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"reference.param_dtype must be one of {list(FROZEN_DTYPES)}, got "
                         f"{dtype!r}")
    return dtype


def reference_model(c: ConfigDict, decoder, *, mesh, rules) -> nnx.Module:
    """The frozen reference (`reference.source`, else a copy of the initial policy), placed."""
    ref = build.reference_module(c, decoder, mesh=mesh, rules=rules)
    if ref is decoder:  # a loaded policy: the reference must not move with it
        # own buffers, not nnx.clone's shared ones: the policy's are donated into the train
        # state (`trainee`), which deletes them
        graphdef, st = nnx.split(ref)
        ref = nnx.merge(graphdef, jax.tree.map(jnp.copy, st))
    return frozen(ref, c, mesh=mesh, rules=rules)


def lazy_reference(c: ConfigDict, decoder, *, mesh, rules) -> Callable[[], nnx.Module]:
    """`() -> reference`, built on first call and then reused."""
    return functools.cache(lambda: reference_model(c, decoder, mesh=mesh, rules=rules))


def trainee(c: ConfigDict, rec: Algorithm, decoder, *, optimizer, mesh, rules,
            live_reference: nnx.Module | None = None, base_reference: bool = False) -> Trainee:
    """The trained model from the policy decoder (a module or `rngs -> module`): with the
    record's head, and with `live_reference` carried in the state (frozen: only the policy's
    parameters train, and the forward adds `ref_logps` to each batch).

    With `lora.rank` > 0 the model gets LoRA adapters: only they (and a reward / value head)
    train, the base stays in `state.rest` and out of checkpoints; `base_reference` then makes
    the forward add `ref_logps` of the same model with its adapters off (the base: one model in
    memory, no `live_reference`)."""
    from prefjax.models.heads import RewardModel
    from prefjax.pipeline import rollouts

    seed, chunk = c.seed, c.model.logps_chunk or None
    # online: the loss's log-probs at the temperature the rollouts were scored at
    temperature = rollouts.scoring_temperature(c) if rec.online else 1.0
    forward = functools.partial(policy_out, chunk_size=chunk, temperature=temperature)
    trainable = nnx.Param
    make = decoder
    if rec.head == "reward":
        make = (RewardModel(decoder, rngs=nnx.Rngs(seed)) if isinstance(decoder, nnx.Module)
                else lambda rngs: RewardModel(decoder(rngs), rngs=rngs))
    elif rec.head == "value":
        make = value_model(c, build.materialize(decoder, seed), mesh=mesh, rules=rules)
    if rec.online:
        rollouts.check_online(c, rec)
        if rollouts.adaptive_kl(c):  # the controller's state travels with the model's
            make = build.materialize(make, seed)
            setattr(make, rollouts.KL_CTL,
                    rollouts.KLCoef(jnp.asarray(float(c.online.kl_coef), jnp.float32)))
    spec = lora.LoRASpec.from_config(c.get("lora"))
    if spec is not None:
        check_lora(c, live_reference, base_reference)
        make, trainable = with_adapters(make, spec, seed), lora.TRAINABLE
        if base_reference:
            forward = base_reference_forward(chunk)
    if live_reference is not None:
        make = WithReference(build.materialize(make, seed), live_reference)
        forward, trainable = live_reference_forward(chunk), POLICY_PARAMS
    kw = dict(seed=seed, trainable=trainable)
    abstract = abstract_state_for(make, optimizer, **kw)  # the restore target: nothing built
    shardings = state_shardings(abstract, mesh, rules)
    if isinstance(make, nnx.Module):
        def init_state():
            # donated: the loaded weights move into the state instead of being copied (the
            # module outlives this call in closures; a second copy of a 0.5B policy is 2 GB)
            return state_from_module(make, optimizer, mesh=mesh, rules=rules, donate=True,
                                     **kw)[0]
    else:
        def init_state():
            return create_train_state(make, optimizer, mesh=mesh, rules=rules, **kw)[0]
    if spec is not None:  # the frozen base is rebuilt from its source on resume
        return Trainee(abstract, shardings, init_state, forward, frozen=lora.FROZEN_BASE,
                       frozen_rest=lambda: place_frozen(build.materialize(make, seed), shardings,
                                                        frozen=lora.FROZEN_BASE,
                                                        trainable=trainable))
    if live_reference is None:
        return Trainee(abstract, shardings, init_state, forward)
    # a live reference is rebuilt from its source on resume, never written to checkpoints
    return Trainee(abstract, shardings, init_state, forward, frozen=FROZEN_REFERENCE,
                   frozen_rest=lambda: place_frozen(make, shardings, trainable=trainable))


def uses_adapters(c: ConfigDict) -> bool:
    """Whether the run trains LoRA adapters (`lora.rank` > 0) instead of the whole model."""
    return lora.LoRASpec.from_config(c.get("lora")) is not None


def base_is_reference(c: ConfigDict) -> bool:
    """A LoRA run without `reference.source`: its reference is its own base (adapters off)."""
    return uses_adapters(c) and not c.reference.source


def check_lora(c: ConfigDict, live_reference, base_reference: bool) -> None:
    """Fail at start, naming the field, for a reference a LoRA run cannot use."""
    if live_reference is not None:
        raise ValueError("a LoRA run (lora.rank > 0) takes its live reference from its own base "
                         "(adapters off, base_reference=True), not a second model")
    if base_reference and c.reference.source:
        raise ValueError(f"lora.rank > 0 with reference.mode='live' uses the base model (adapters "
                         f"off) as the reference, but reference.source={c.reference.source!r} "
                         "names another model; clear it or use reference.mode='precomputed'")


def with_adapters(make, spec: lora.LoRASpec, seed: int):
    """`make` (a module or `rngs -> module`) with LoRA adapters on its decoders' projections;
    the adapters draw from their own stream (`seed + 3`), so the base init is unchanged."""
    if isinstance(make, nnx.Module):
        return lora.add_adapters(make, spec, nnx.Rngs(seed + 3))
    return lambda rngs: lora.add_adapters(make(rngs), spec, nnx.Rngs(seed + 3))


def base_reference_forward(chunk_size: int | None = None):
    """Forward of a LoRA model -> `(PolicyOut, {"ref_logps": [b]})`, the reference being the
    same model with its adapters off: the base weights serve both, nothing is copied."""

    def forward(model: nnx.Module, batch) -> tuple:
        out = policy_out(model, batch, chunk_size=chunk_size)
        ref = policy_out(lora.adapters_off(model), batch, chunk_size=chunk_size)
        return out, {"ref_logps": ref.logps}

    return forward


def value_model(c: ConfigDict, policy: nnx.Module, *, mesh, rules) -> nnx.Module:
    """PPO's policy + value function (`online.value_model`): "shared", a random scalar head on
    the policy's trunk; "reward", a separate trunk and head initialised from the reward model
    `online.reward` (InstructGPT, TRL), loaded in float32 (it trains)."""
    from prefjax.models.heads import PolicyWithValue, RewardModel
    from prefjax.models.value import PolicyAndValueModel

    if c.online.value_model == "shared":
        return PolicyWithValue(policy, rngs=nnx.Rngs(c.seed + 1))
    if c.online.value_model != "reward":
        raise ValueError(f"online.value_model must be shared | reward, got "
                         f"{c.online.value_model!r}")
    rm = RewardModel.from_hf(build.hf_folder(c.online.reward), rngs=nnx.Rngs(c.seed + 1),
                             mesh=mesh, rules=rules)
    return PolicyAndValueModel.from_reward_model(policy, rm)


def policy_of(model: nnx.Module) -> nnx.Module:
    """The sampling policy inside a state's model (a live reference's wrapper removed)."""
    return model.policy if isinstance(model, WithReference) else model


def export_model(model: nnx.Module) -> nnx.Module:
    """What a run exports: the policy without a live reference or a value head (a reward model
    exports whole: decoder + head)."""
    from prefjax.models.heads import PolicyWithValue

    model = policy_of(model)
    return model.decoder if isinstance(model, PolicyWithValue) else model
