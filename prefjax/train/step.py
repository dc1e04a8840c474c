"""One builder for every train step: merge the model, forward, loss, grads, optax update, jitted.

The step is a pure function of `(state, batch)`; everything static (loss, optimizer, forward,
mesh, accumulation) is captured in the closure, so the same builder serves every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax.parallel import BATCH_AXES, DEFAULT_RULES, Rules, batch_shardings
from prefjax.train.state import TrainState
from prefjax.typing import Batch, LossFn, Metrics, PolicyOut

# A forward returns the PolicyOut, or `(PolicyOut, additions)` where `additions` are batch keys
# it computed without gradient (a live reference's `ref_logps`), merged in before the loss.
Forward = Callable[[nnx.Module, Batch], PolicyOut | tuple[PolicyOut, Batch]]


def run_forward(forward: Forward, model: nnx.Module, batch: Batch) -> tuple[PolicyOut, Batch]:
    """`forward(model, batch)` normalized to `(out, batch with the forward's additions)`."""
    res = forward(model, batch)
    if isinstance(res, PolicyOut):
        return res, batch
    out, extra = res
    return out, {**batch, **jax.lax.stop_gradient(extra)}


def _default_forward(model: nnx.Module, batch: Batch) -> PolicyOut:
    from prefjax.lm import policy_out  # lazy: lm depends on the model code, not the other way

    return policy_out(model, batch)


def _tail_rows(batch: Batch, tail_key: str | None, axis: int = 0) -> int:
    """m, the size of the tail row group flagged by `batch[tail_key]` (0 without one)."""
    return batch[tail_key].shape[axis] if tail_key is not None and tail_key in batch else 0


def split_microbatches(batch: Batch, k: int, *, paired: bool = True,
                       tail_key: str | None = None) -> Batch:
    """Reshape every leaf `[B, ...]` into `[k, B/k, ...]` micro-batches.

    paired=True (pairwise batches: rows `[:n]` chosen, `[n:2n]` rejected, then, when `tail_key`
    names a key of the batch, `m` rows of a tail group flagged by that key's `[m]` leaf, B = 2n +
    m; e.g. an algorithm record's extra rows): micro-batch i holds chosen rows
    `i*n/k .. (i+1)*n/k`, their rejected partners at the same offsets after n, and tail rows
    `2n + i*m/k ..`, so each micro-batch is itself a valid batch of the same layout, and the
    `tail_key` leaf is split alike. paired=False: contiguous row blocks (the tail key too).
    Both partition the rows into equal parts, so a loss that is a mean over pairs (rows) gives
    the same mean of micro-batch losses.
    """
    if k == 1:
        return jax.tree.map(lambda x: x[None], batch)
    rows = {x.shape[0] for key, x in batch.items() if key != tail_key and jnp.ndim(x)}
    if len(rows) != 1:
        raise ValueError(
            "batch leaves disagree on the number of rows: "
            f"{ {key: jnp.shape(x) for key, x in batch.items()} }")
    (b,) = rows
    m = _tail_rows(batch, tail_key)
    pairs = b - m
    if paired and pairs % 2:
        raise ValueError(f"a pairwise batch needs an even number of chosen+rejected rows, got "
                         f"{pairs} ({b} rows minus {m} tail rows of {tail_key!r})")
    parts = [(0, pairs // 2), (pairs // 2, pairs // 2), (pairs, m)] if paired else [(0, b)]
    for start, size in parts:
        if size % k:
            raise ValueError(
                f"grad_accum={k} must divide each row group of the batch: got {size} rows in "
                f"[{start}, {start + size}) (batch of {b} rows, {m} tail rows, "
                f"paired={paired})")
    if m % k:
        raise ValueError(f"grad_accum={k} must divide the {m} tail rows of {tail_key!r}")

    def split(key, x):
        if key == tail_key:
            return x.reshape(k, m // k, *x.shape[1:])
        if jnp.ndim(x) == 0 or x.shape[0] != b:
            raise ValueError(f"batch[{key!r}] has shape {jnp.shape(x)}; expected {b} rows")
        chunks = [x[s:s + n].reshape(k, n // k, *x.shape[1:]) for s, n in parts if n]
        return jnp.concatenate(chunks, axis=1)

    return {key: split(key, x) for key, x in batch.items()}


def merge_microbatches(stacked: Batch, *, paired: bool = True,
                       tail_key: str | None = None) -> Batch:
    """Inverse of `split_microbatches`: `[k, b, ...]` blocks, each a pairwise batch (chosen,
    rejected, tail rows), into one `[k*b, ...]` batch with all chosen rows first, then all
    rejected, then all tail rows (block order kept inside each group)."""
    b = next(x for key, x in stacked.items() if key != tail_key).shape[1]
    m = _tail_rows(stacked, tail_key, axis=1)
    half = (b - m) // 2
    groups = [(0, half), (half, 2 * half), (2 * half, b)] if paired else [(0, b)]

    def merge(key, x):
        if key == tail_key or not paired:
            return x.reshape(-1, *x.shape[2:])
        return jnp.concatenate(
            [x[:, s:e].reshape(-1, *x.shape[2:]) for s, e in groups if e > s], axis=0)

    return {key: merge(key, x) for key, x in stacked.items()}


def gather_process_blocks(batch: Batch, num_blocks: int, *, paired: bool = True,
                          tail_key: str | None = None) -> Batch:
    """Global pairwise layout from per-process pairwise batches.

    Each of `num_blocks` processes loads its own pairs as `[chosen, rejected, tail]`, so the
    global array made by `shard_batch` is `[c0, r0, c1, r1, ...]`; losses expect
    `[c0, c1, ..., r0, r1, ...]` (typing.py). Identity for one process or unpaired batches.
    The pipeline does this once at the boundary (`prefjax.pipeline.batches.global_batch`) and
    builds its steps with `process_blocks=1`.
    """
    if num_blocks == 1 or not paired:
        return batch
    blocks = {key: x.reshape(num_blocks, -1, *x.shape[1:]) for key, x in batch.items()}
    return merge_microbatches(blocks, paired=paired, tail_key=tail_key)


def _learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate recorded by `optax.inject_hyperparams`, wherever it sits in the chain."""
    found = []

    def visit(node):
        hp = getattr(node, "hyperparams", None)
        if isinstance(hp, Mapping) and "learning_rate" in hp:
            found.append(hp["learning_rate"])
        elif isinstance(node, tuple | list):
            for child in node:
                visit(child)

    visit(opt_state)
    return jnp.asarray(found[0], jnp.float32) if found else None


def _loss_and_grads(loss_fn, forward, state: TrainState, batch: Batch, k: int, paired: bool,
                    tail_key: str | None):
    """Mean loss, metrics and grads over k micro-batches (`lax.scan` keeps one in memory)."""

    def loss_of(params, mb):
        # rest's Variables re-created at this trace level: a remat'd frozen module (a live
        # reference) may write to them inside the grad trace
        model = nnx.merge(state.graphdef, params, jax.tree.map(lambda x: x, state.rest))
        out, mb = run_forward(forward, model, mb)
        return loss_fn(out, mb)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if k == 1:
        (loss, metrics), grads = grad_fn(state.params, batch)
        return loss, metrics, grads

    mbs = split_microbatches(batch, k, paired=paired, tail_key=tail_key)
    # Keep each micro-batch split over the batch axes (the split itself moves rows around).
    n = _batch_shards()
    mbs = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x, PartitionSpec(None, BATCH_AXES) if x.shape[1] % n == 0 else PartitionSpec()),
        mbs)

    def body(acc, mb):
        (loss, metrics), grads = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, acc, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (losses, metrics) = jax.lax.scan(body, zeros, mbs)
    grads = jax.tree.map(lambda g: g / k, grads)
    return losses.mean(), jax.tree.map(lambda v: v.mean(0), metrics), grads


def _batch_shards() -> int:
    """data * fsdp of the mesh the step runs under (set by `_ShardedCall`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape["data"] * mesh.shape["fsdp"]


def build_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Mesh,
    state_shardings: TrainState, forward: Forward | None = None, grad_accum: int = 1,
    max_grad_norm: float | None = None, rules: Rules = DEFAULT_RULES, donate: bool = True,
    paired: bool = True, process_blocks: int | None = None, tail_key: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`step(state, batch) -> (state, metrics)`, jitted over `mesh`.

    Inside jit: merge graphdef + params, `out = forward(model, batch)` (default
    `prefjax.lm.policy_out`), `(loss, metrics) = loss_fn(out, batch)`, grads w.r.t.
    `state.params` only, optional global-norm clipping, optax update.
    Batch leaves `[B, ...]` are split over ("data", "fsdp"); with `grad_accum=k`, B is split
    into k micro-batches (`split_microbatches`, `paired` and `tail_key` as there: a batch with
    a tail row group, e.g. an algorithm record's extra rows, names its flag key) and grads /
    metrics are
    averaged. Metrics add `loss`, `grad_norm` (before clipping), `nonfinite` (1.0 when the loss
    or grad norm is NaN/inf: the update is then skipped and `state` returned unchanged, so the
    caller can stop while the last good state survives) and `learning_rate` when the optimizer
    is wrapped in `optax.inject_hyperparams`. `rules` is accepted for the builder's symmetry with
    state creation; parameter placement comes from `state_shardings`.
    process_blocks (default `jax.process_count()`): the global batch is that many per-process
    pairwise batches (see `gather_process_blocks`); they are regrouped before the forward.
    Pass 1 when the batch is already in global order (`prefjax.pipeline.batches.global_batch`).
    """
    del rules
    blocks = jax.process_count() if process_blocks is None else process_blocks
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        max_grad_norm = None
    forward = forward or _default_forward
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        batch = gather_process_blocks(batch, blocks, paired=paired, tail_key=tail_key)
        loss, metrics, grads = _loss_and_grads(
            loss_fn, forward, state, batch, grad_accum, paired, tail_key)
        grad_norm = optax.global_norm(grads)
        if max_grad_norm is not None:
            scale = jnp.minimum(1.0, max_grad_norm / jnp.maximum(grad_norm, 1e-12))
            grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        new = jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, state)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "nonfinite": bad.astype(jnp.float32)}
        lr = _learning_rate(opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        return new, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)

    return _ShardedCall(step, mesh, state_shardings, replicated, donate)


def build_eval_step(
    loss_fn: LossFn, *, mesh: Mesh, state_shardings: TrainState, forward: Forward | None = None,
    paired: bool = True, process_blocks: int | None = None, tail_key: str | None = None,
) -> Callable[[TrainState, Batch], Metrics]:
    """`eval_step(state, batch) -> metrics` (same forward and loss as training, no gradients)."""
    forward = forward or _default_forward
    blocks = jax.process_count() if process_blocks is None else process_blocks
    replicated = NamedSharding(mesh, PartitionSpec())

    def evaluate(state: TrainState, batch: Batch) -> Metrics:
        batch = gather_process_blocks(batch, blocks, paired=paired, tail_key=tail_key)
        model = nnx.merge(state.graphdef, state.params, state.rest)
        out, batch = run_forward(forward, model, batch)
        loss, metrics = loss_fn(out, batch)
        return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), {**metrics, "loss": loss})

    return _ShardedCall(evaluate, mesh, state_shardings, replicated, donate=False, eval_only=True)


class _ShardedCall:
    """Jit `fn(state, batch)` with explicit shardings; one compiled function per batch layout.

    The batch shardings depend on which keys a batch has and which leaves are row-split (a short
    tail-group flag replicates), so they are fixed on first sight of a layout and cached.
    """

    def __init__(self, fn, mesh, state_shardings, replicated, donate, eval_only=False):
        self.fn, self.mesh, self.state_shardings = fn, mesh, state_shardings
        self.replicated, self.donate, self.eval_only = replicated, donate, eval_only
        self._jitted: dict = {}

    def __call__(self, state, batch):
        shardings = batch_shardings(batch, self.mesh)
        key = tuple(sorted((k, s.spec) for k, s in shardings.items()))
        if key not in self._jitted:
            out = self.replicated if self.eval_only else (self.state_shardings, self.replicated)
            self._jitted[key] = jax.jit(
                self.fn, in_shardings=(self.state_shardings, shardings), out_shardings=out,
                donate_argnums=(0,) if self.donate else ())
        with jax.set_mesh(self.mesh):
            return self._jitted[key](state, batch)
