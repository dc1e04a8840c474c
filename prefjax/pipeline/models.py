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
        ref = nnx.clone(ref)
    return frozen(ref, c, mesh=mesh, rules=rules)


def lazy_reference(c: ConfigDict, decoder, *, mesh, rules) -> Callable[[], nnx.Module]:
    """`() -> reference`, built on first call and then reused."""
    return functools.cache(lambda: reference_model(c, decoder, mesh=mesh, rules=rules))


def trainee(c: ConfigDict, rec: Algorithm, decoder, *, optimizer, mesh, rules,
            live_reference: nnx.Module | None = None) -> Trainee:
    """The trained model from the policy decoder (a module or `rngs -> module`): with the
    record's head, and with `live_reference` carried in the state (frozen: only the policy's
    parameters train, and the forward adds `ref_logps` to each batch)."""
    from prefjax.models.heads import PolicyWithValue, RewardModel

    seed, chunk = c.seed, c.model.logps_chunk or None
    forward, trainable = functools.partial(policy_out, chunk_size=chunk), nnx.Param
    make = decoder
    if rec.head == "reward":
        make = (RewardModel(decoder, rngs=nnx.Rngs(seed)) if isinstance(decoder, nnx.Module)
                else lambda rngs: RewardModel(decoder(rngs), rngs=rngs))
    elif rec.head == "value":
        make = PolicyWithValue(build.materialize(decoder, seed), rngs=nnx.Rngs(seed + 1))
    if live_reference is not None:
        make = WithReference(build.materialize(make, seed), live_reference)
        forward, trainable = live_reference_forward(chunk), POLICY_PARAMS
    kw = dict(seed=seed, trainable=trainable)
    abstract = abstract_state_for(make, optimizer, **kw)  # the restore target: nothing built
    shardings = state_shardings(abstract, mesh, rules)
    if isinstance(make, nnx.Module):
        def init_state():
            return state_from_module(make, optimizer, mesh=mesh, rules=rules, **kw)[0]
    else:
        def init_state():
            return create_train_state(make, optimizer, mesh=mesh, rules=rules, **kw)[0]
    if live_reference is None:
        return Trainee(abstract, shardings, init_state, forward)
    # a live reference is rebuilt from its source on resume, never written to checkpoints
    return Trainee(abstract, shardings, init_state, forward, frozen=FROZEN_REFERENCE,
                   frozen_rest=lambda: place_frozen(make, shardings, trainable=trainable))


def policy_of(model: nnx.Module) -> nnx.Module:
    """The sampling policy inside a state's model (a live reference's wrapper removed)."""
    return model.policy if isinstance(model, WithReference) else model


def export_model(model: nnx.Module) -> nnx.Module:
    """What a run exports: the policy without a live reference or a value head (a reward model
    exports whole: decoder + head)."""
    from prefjax.models.heads import PolicyWithValue

    model = policy_of(model)
    return model.decoder if isinstance(model, PolicyWithValue) else model
