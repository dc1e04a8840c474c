"""TrainState: the split NNX model + optax state as one pytree, created directly sharded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax.parallel import DEFAULT_RULES, Rules, param_shardings


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    graphdef: static NNX graph (module structure), merged with the states inside the step.
    params: nnx.State of the trainable parameters (what gradients are taken against).
    rest: nnx.State of everything else (frozen parameters, other variables); carried unchanged.
    opt_state: plain optax state of `params`.
    step: int32 scalar, number of applied updates.
    rng: uint32 PRNG key data `[2]` (`jax.random.key_data`); constant, derive per-step keys
        with `step_key(state)`.
    """

    graphdef: Any = struct.field(pytree_node=False)
    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def merge_model(state: TrainState) -> nnx.Module:
    """The NNX module that `state` describes (for evaluation, sampling, export outside the step)."""
    return nnx.merge(state.graphdef, state.params, state.rest)


def _split(model: nnx.Module, trainable: Any):
    graphdef, params, rest = nnx.split(model, trainable, ...)
    return graphdef, params, rest


def abstract_train_state(
    model_fn: Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation, *,
    seed: int = 0, trainable: Any = nnx.Param,
) -> TrainState:
    """TrainState of ShapeDtypeStructs (nothing allocated); its Variables keep their metadata."""

    def init():
        return _init_state(model_fn, optimizer, seed, trainable)

    with nnx.use_eager_sharding(False):
        return jax.eval_shape(init)


def _init_state(model_fn, optimizer, seed, trainable) -> TrainState:
    # Eager sharding would place each Variable on creation and needs a mesh named by the logical
    # axes; we place the whole state through jit out_shardings instead.
    with nnx.use_eager_sharding(False):
        model = model_fn(nnx.Rngs(seed))
    graphdef, params, rest = _split(model, trainable)
    return _fresh_state(graphdef, optimizer, seed)(params, rest)


def _fresh_state(graphdef, optimizer: optax.GradientTransformation, seed: int):
    """`(params, rest) -> TrainState` at step 0: fresh optimizer state, the run's rng."""

    def build(params, rest):
        return TrainState(
            graphdef=graphdef, params=params, rest=rest, opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)))

    return build


def state_shardings(
    abstract_state: TrainState, mesh: Mesh, rules: Rules = DEFAULT_RULES,
) -> TrainState:
    """NamedShardings for every leaf of `abstract_state` (same pytree structure).

    Parameters follow their logical names through `rules`; optimizer moments mirror their
    parameter (optax keeps the Variable wrappers and their metadata); step, rng, counters and
    unannotated leaves are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return abstract_state.replace(
        params=param_shardings(abstract_state.params, mesh, rules),
        rest=param_shardings(abstract_state.rest, mesh, rules),
        opt_state=param_shardings(abstract_state.opt_state, mesh, rules),
        step=replicated, rng=replicated)


def create_train_state(
    model_fn: Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation, *,
    mesh: Mesh, rules: Rules = DEFAULT_RULES, seed: int = 0, trainable: Any = nnx.Param,
) -> tuple[TrainState, TrainState]:
    """Build `(state, shardings)` with every leaf created already sharded on `mesh`.

    Never materializes the unsharded state: `eval_shape` gives shapes and sharding metadata,
    `state_shardings` maps them to the mesh, and a jitted init with those out_shardings creates
    each shard on its device. `model_fn(rngs)` builds the module (e.g.
    `lambda rngs: Llama(cfg, rngs=rngs)`); `trainable` is an nnx filter (default all
    `nnx.Param`; e.g. `nnx.All(nnx.Param, nnx.Not(nnx.PathContains('embed')))` freezes the
    embedding, which then lives in `state.rest`).
    """
    abstract = abstract_train_state(model_fn, optimizer, seed=seed, trainable=trainable)
    shardings = state_shardings(abstract, mesh, rules)
    init = jax.jit(lambda: _init_state(model_fn, optimizer, seed, trainable),
                   out_shardings=shardings)
    with nnx.use_eager_sharding(False):
        state = init()
    return state, shardings


def state_from_module(
    model: nnx.Module, optimizer: optax.GradientTransformation, *, mesh: Mesh,
    rules: Rules = DEFAULT_RULES, seed: int = 0, trainable: Any = nnx.Param,
    donate: bool = False,
) -> tuple[TrainState, TrainState]:
    """`(state, shardings)` around an existing module (e.g. weights from `load_hf`).

    Parameters are moved onto their shardings and the optimizer state is created sharded; the
    rng matches `create_train_state(seed=seed)`. The state's params are new arrays (a second
    copy of the trainable weights while `model` lives), unless `donate`: they then take over
    the module's buffers, which are deleted (the module's trainable arrays cannot be read
    afterwards; its other state is copied as before).
    """
    graphdef, params, rest = _split(model, trainable)
    build = _fresh_state(graphdef, optimizer, seed)

    shardings = state_shardings(jax.eval_shape(build, params, rest), mesh, rules)
    params = jax.device_put(params, shardings.params)
    rest = jax.device_put(rest, shardings.rest)
    make = jax.jit(build, out_shardings=shardings, donate_argnums=(0,) if donate else ())
    return make(params, rest), shardings


def abstract_module(model_fn: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
    """The module `model_fn` builds, with ShapeDtypeStruct leaves (nothing allocated)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: model_fn(nnx.Rngs(seed)))


def abstract_state_for(
    model: nnx.Module | Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation,
    *, seed: int = 0, trainable: Any = nnx.Param,
) -> TrainState:
    """The abstract TrainState (ShapeDtypeStructs) of a run, without building a concrete one.

    model: a function of rngs (random init), or a module whose leaves are arrays (e.g. loaded
    by `load_hf`) or ShapeDtypeStructs (`abstract_module`, or an eval_shape'd loader); mixed
    is fine (e.g. `WithReference(abstract policy, loaded reference)`). Nothing is copied: the
    result is the restore target of `Checkpointer.restore` and, through `state_shardings`, the
    layout of the step. Same structure and rng as `create_train_state` / `state_from_module`.
    """
    if not isinstance(model, nnx.Module):
        return abstract_train_state(model, optimizer, seed=seed, trainable=trainable)
    graphdef, params, rest = _split(model, trainable)
    build = _fresh_state(graphdef, optimizer, seed)

    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    return jax.eval_shape(build, jax.tree.map(abstract, params), jax.tree.map(abstract, rest))


def split_rest(rest: Any, frozen: Any) -> tuple[Any, Any]:
    """`(frozen part, the others)` of `state.rest` by nnx filter `frozen` (e.g.
    `FROZEN_REFERENCE`); `merge_rest` puts them back together."""
    return nnx.split_state(rest, frozen, ...)


def merge_rest(frozen_part: Any, others: Any) -> Any:
    """Inverse of `split_rest`."""
    return nnx.merge_state(frozen_part, others)


# The frozen half of a `WithReference` (prefjax.train.reference): its reference's variables.
FROZEN_REFERENCE = nnx.PathContains("reference")


def place_frozen(
    model: nnx.Module, shardings: TrainState, *, frozen: Any = FROZEN_REFERENCE,
    trainable: Any = nnx.Param,
) -> Any:
    """The frozen part of `model`'s rest, placed on its shardings (from `state_shardings`).

    What `Checkpointer.restore(frozen_rest=...)` puts back into a resumed state: the checkpoint
    holds only what training changes, the frozen part comes from the freshly built model. Only
    the frozen leaves of `model` need be concrete. The result is a copy: the train step donates
    the state, which would otherwise delete `model`'s arrays under whoever else holds it (drop
    `model` afterwards so the reference is not held twice).
    """
    _, _, rest = _split(model, trainable)
    part, _ = split_rest(rest, frozen)
    sh, _ = split_rest(shardings.rest, frozen)
    return jax.device_put(part, sh, may_alias=False)


def step_key(state: TrainState) -> jax.Array:
    """A PRNG key for this step: `fold_in(rng, step)`, so a resumed run draws the same keys."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def count_params(state: TrainState) -> int:
    """Number of trainable parameters."""
    return sum(int(x.size) for x in jax.tree.leaves(state.params))
