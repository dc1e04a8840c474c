"""One builder for every train step: merge the model, forward, loss, grads, optax update, jitted.

The step is a pure function of `(state, batch)`; everything static (loss, optimizer, forward,
mesh, accumulation) is captured in the closure, so the same builder serves every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax.parallel import BATCH_AXES, DEFAULT_RULES, Rules, batch_shardings
from prefjax.train.moments import KEEPS_STATE_ON_SKIP
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
    Both partition the rows into equal parts. Leaves of one row per pair (`[n]`, e.g.
    a per-pair `margin`) split like the chosen rows. The train step does not average micro-batch
    losses (a mean of per-micro-batch token means is not the batch's token mean): it evaluates
    the loss once on the reassembled full-batch outputs (`_loss_and_grads`). Packed rows (keys
    `packed_*`, `prefjax.data.packing`, already packed per micro-batch) split into k
    contiguous blocks.
    """
    if k == 1:
        return jax.tree.map(lambda x: x[None], batch)
    packed = {key for key in batch if key.startswith("packed_")}
    rows = {x.shape[0] for key, x in batch.items()
            if key != tail_key and key not in packed and jnp.ndim(x)}
    b = max(rows, default=0)
    m = _tail_rows(batch, tail_key)
    pairs = b - m
    # per-pair leaves ([n], e.g. a per-pair `margin`) beside the [2n + m] rows
    if rows - ({b, pairs // 2} if paired else {b}):
        raise ValueError(
            "batch leaves disagree on the number of rows: "
            f"{ {key: jnp.shape(x) for key, x in batch.items()} }")
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
        if key in packed:
            if x.shape[0] % k:
                raise ValueError(f"batch[{key!r}] has {x.shape[0]} packed rows, not k={k} "
                                 "blocks (pack with micro_batches=grad_accum)")
            return x.reshape(k, x.shape[0] // k, *x.shape[1:])
        if paired and jnp.ndim(x) and x.shape[0] == pairs // 2 != b:  # per pair
            return x.reshape(k, x.shape[0] // k, *x.shape[1:])
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
    b = max(x.shape[1] for key, x in stacked.items() if key != tail_key)
    m = _tail_rows(stacked, tail_key, axis=1)
    half = (b - m) // 2
    groups = [(0, half), (half, 2 * half), (2 * half, b)] if paired else [(0, b)]

    def merge(key, x):
        if key == tail_key or not paired or x.shape[1] == half != b:  # tail, per-pair leaves
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


def _forward_parts(forward: Forward, model: nnx.Module, batch: Batch) -> tuple[PolicyOut, Batch]:
    """`forward(model, batch)` as `(out, additions)`; additions detached ({} without any)."""
    res = forward(model, batch)
    if isinstance(res, PolicyOut):
        return res, {}
    out, extra = res
    return out, jax.lax.stop_gradient(dict(extra))


def _check_rows(what: str, tree, rows: int) -> None:
    """Every leaf of `tree` must be row-leading ([rows, ...]): the step reassembles rows."""
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.ndim(x) == 0 or x.shape[0] != rows:
            raise ValueError(
                f"grad_accum needs every {what} leaf to have one entry per batch row: "
                f"{jax.tree_util.keystr(path)} has shape {jnp.shape(x)}, expected ({rows}, ...)")


def _row_order(batch: Batch, k: int, paired: bool, tail_key: str | None) -> np.ndarray:
    """[k, B/k] int: global row index of each micro-batch row (split_microbatches' layout)."""
    rows = next(x.shape[0] for key, x in batch.items()
                if key != tail_key and not key.startswith("packed_") and jnp.ndim(x))
    probe = {"row": np.arange(rows)}
    if tail_key is not None and tail_key in batch:
        probe[tail_key] = np.zeros(batch[tail_key].shape[:1])
    with jax.ensure_compile_time_eval():  # shapes only: a constant, even under jit
        return np.asarray(split_microbatches(probe, k, paired=paired, tail_key=tail_key)["row"])


def _loss_and_grads(loss_fn, forward, state: TrainState, batch: Batch, k: int, paired: bool,
                    tail_key: str | None):
    """Loss, metrics and grads of the whole batch; with k > 1 one micro-batch of activations
    is in memory at a time, and the result is still the whole batch's (not a mean of k).

    k > 1 runs two `lax.scan`s over the k micro-batches:
      1. forward only: the micro-batch PolicyOuts (and forward additions) are put back in the
         batch's row order, so `loss_fn(out, batch)` runs once on the full batch: token means,
         pair means, sorts, stds and every metric are the full batch's, whatever the loss;
      2. forward + backward: c = d loss / d out (small: [B] and [B, t] leaves) is pulled back
         through each micro-batch's forward, grad of sum(out_i * c_i), and the k grads summed.
    By the chain rule that is the full batch's gradient. Cost: one extra forward without
    gradients per micro-batch (and a live reference in `forward` runs twice).
    """

    def model_of(params):
        # rest's Variables re-created at this trace level: a remat'd frozen module (a live
        # reference) may write to them inside the grad trace
        return nnx.merge(state.graphdef, params, jax.tree.map(lambda x: x, state.rest))

    if k == 1:
        def loss_of(params, mb):
            out, mb = run_forward(forward, model_of(params), mb)
            return loss_fn(out, mb)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params, batch)
        return loss, metrics, grads

    mbs = split_microbatches(batch, k, paired=paired, tail_key=tail_key)
    order = _row_order(batch, k, paired, tail_key)  # [k, b]
    b = order.shape[1]
    # Keep each micro-batch split over the batch axes (the split itself moves rows around).
    n = _batch_shards()

    def constrain(x):
        return jax.lax.with_sharding_constraint(
            x, PartitionSpec(None, BATCH_AXES) if x.shape[1] % n == 0 else PartitionSpec())

    mbs = jax.tree.map(constrain, mbs)

    def outputs(_, mb):
        out, extra = _forward_parts(forward, model_of(state.params), mb)
        _check_rows("PolicyOut", out, b)
        _check_rows("forward addition", extra, b)
        return None, (out, extra)

    _, (outs, extras) = jax.lax.scan(outputs, None, mbs)
    inverse = np.argsort(order.reshape(-1))
    out, extra = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[inverse], (outs, extras))
    full = {**batch, **extra}
    leaves, treedef = jax.tree.flatten(out)
    # integer leaves (a forward's int lengths) carry no gradient: constants of the loss
    diff = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def loss_of_out(xs):
        it = iter(xs)
        return loss_fn(treedef.unflatten([next(it) if d else x for x, d in zip(leaves, diff)]),
                       full)

    (loss, metrics), cot = jax.value_and_grad(loss_of_out, has_aux=True)(
        [x for x, d in zip(leaves, diff) if d])
    cot = jax.tree.map(lambda c: constrain(c[order]), cot)  # [k, b, ...] like mbs

    def pullback(params, mb, cs):
        out, _ = _forward_parts(forward, model_of(params), mb)
        xs = [x for x, d in zip(jax.tree.leaves(out), diff) if d]
        return sum(jnp.sum(x.astype(jnp.float32) * jax.lax.stop_gradient(c).astype(jnp.float32))
                   for x, c in zip(xs, cs, strict=True))

    grad_fn = jax.grad(pullback)

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, grad_fn(state.params, *xs)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, _ = jax.lax.scan(body, zeros, (mbs, cot))
    return loss, metrics, grads


def _keep_on_skip(bad: jax.Array, new: Any, old: Any) -> Any:
    """Optimizer state `old` where `bad`, else `new`; nodes of a skip-aware optimizer
    (`moments.KEEPS_STATE_ON_SKIP`) are taken as they are (they already equal `old`)."""
    kept = lambda x: isinstance(x, KEEPS_STATE_ON_SKIP)  # noqa: E731
    return jax.tree.map(lambda n, o: n if kept(n) else jnp.where(bad, o, n), new, old,
                        is_leaf=kept)


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
    a tail row group, e.g. an algorithm record's extra rows, names its flag key) and the loss,
    metrics and grads are still exactly those of the whole batch, for any loss (token means,
    sorts and batch stds included; see `_loss_and_grads`), at the cost of one extra forward
    without gradients per micro-batch. Metrics add `loss`, `grad_norm` (before clipping),
    `nonfinite` (1.0 when the loss or grad norm is NaN/inf: the update is then skipped and
    `state` returned unchanged, so the caller can stop while the last good state survives) and
    `learning_rate` when the optimizer is wrapped in `optax.inject_hyperparams`. `rules` is
    accepted for the builder's symmetry with state creation; parameter placement comes from
    `state_shardings`.
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
        bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        updates, opt_state = optax.with_extra_args_support(optimizer).update(
            grads, state.opt_state, state.params, skip=bad)
        # Skipping without selecting the old params or moments back: such a select reads the
        # old buffers after the update has written the new ones in place, and XLA copies them
        # all (+2x params of temporaries with AdamW). Zero updates leave the params bitwise
        # unchanged; a skip-aware optimizer (`moments.adamw`) keeps its own state.
        updates = jax.tree.map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), updates)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(params=params, opt_state=_keep_on_skip(bad, opt_state,
                                                                   state.opt_state),
                            step=state.step + jnp.where(bad, 0, 1).astype(state.step.dtype))
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
