"""Device mesh, logical-axis rules -> NamedSharding, batch placement and multi-host helpers.

Parameters carry *logical* axis names (`('embed', 'mlp')`, see the model interface contract in
DESIGN.md); a rule table maps each logical name to mesh axes. Data parallelism, FSDP, tensor
parallelism and their combinations are all just a mesh shape plus a rule table.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("pos", None),
    # Names a model may add for stacked / unsplit dimensions: always replicated.
    ("layers", None),
    ("head_dim", None),
    ("seq", None),
)

_STRATEGY_AXES = {  # which mesh axes parameters may use, per strategy
    "auto": ("fsdp", "tensor"),
    "fsdp_tp": ("fsdp", "tensor"),
    "dp": (),
    "fsdp": ("fsdp",),
    "tp": ("tensor",),
}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; at most one size may be -1 (= the remaining devices).

    Axes are `AxisType.Auto`: shardings are GSPMD-style hints that XLA propagates through the
    program, so the same code runs on 1 CPU, simulated devices or a pod.
    `shape` is a dict or ConfigDict; extra keys (e.g. `strategy`) are ignored.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = []
    for ax in AXES:
        v = shape.get(ax, 1)
        if not isinstance(v, int | np.integer) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{ax} must be a positive int or -1, got {v!r}")
        sizes.append(int(v))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if n % fixed:
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes))} does not divide the {n} devices: the product of the "
            f"fixed sizes ({fixed}) must divide the device count")
    sizes = [n // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices but {n} are given; "
            "set one axis to -1 or make the sizes multiply to the device count")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_for(strategy: str = "auto", base: Rules = DEFAULT_RULES) -> Rules:
    """Rule table for a strategy: auto | fsdp_tp (all rules) | dp | fsdp | tp.

    Parameters never use an axis outside the strategy (they replicate over it); the batch always
    splits over ("data", "fsdp"). With `auto` the mesh shape decides: size-1 axes cost nothing.
    """
    if strategy not in _STRATEGY_AXES:
        raise ValueError(
            f"unknown parallel strategy {strategy!r}; use one of {list(_STRATEGY_AXES)}")
    allowed = _STRATEGY_AXES[strategy]

    def keep(axes):
        if axes is None:
            return None
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = tuple(a for a in axes if a in allowed)
        return kept[0] if len(kept) == 1 else (kept or None)

    return tuple((name, axes if name == "batch" else keep(axes)) for name, axes in base)


def logical_to_spec(
    names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical `names`; a dim replicates when its size is not divisible by
    its mesh axes, and a mesh axis is never used twice in one spec."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name in table:
            axes = table[name]
        elif name in mesh.axis_names:
            axes = name
        else:
            raise ValueError(
                f"logical axis {name!r} (in {tuple(names)}) has no sharding rule; known names: "
                f"{sorted(table)}. Add ({name!r}, mesh_axis_or_None) to the rules.")
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_to_sharding(
    names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding for an array of logical axis `names` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


def _var_names(v: nnx.Variable) -> tuple | None:
    names = v.get_metadata().get("out_sharding")
    if names is None or isinstance(names, PartitionSpec | NamedSharding):
        return None if names is None else tuple(getattr(names, "spec", names))
    return tuple(names)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Shardings for a (possibly abstract) tree of nnx Variables / arrays, same structure.

    Variables read their logical names from the `out_sharding` metadata that
    `nnx.with_partitioning` / `nnx.Param(..., out_sharding=...)` store; anything without names
    (plain arrays, optimizer counters, unannotated parameters) replicates.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, nnx.Variable):
            names = _var_names(x)
            shape = x.get_value().shape
            if names is None or len(shape) == 0:
                return x.replace(replicated)
            if len(names) != len(shape):
                raise ValueError(
                    f"parameter of shape {shape} has {len(names)} logical axis names {names}")
            return x.replace(logical_to_sharding(names, mesh, rules, shape))
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ("data", "fsdp"); other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Per-key shardings of a global batch: rows over ("data", "fsdp"); a leaf whose leading dim
    is not divisible by that (e.g. a short `ref_sample_mask`) or a scalar is replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, x in batch.items():
        shape = np.shape(x)
        if len(shape) and shape[0] % n == 0:
            out[k] = batch_sharding(mesh)
        else:
            out[k] = NamedSharding(mesh, PartitionSpec())
    return out


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global jax Arrays from this process's rows (`[b_local, ...]` numpy per key).

    Each process passes its own slice; the global batch is the concatenation over processes in
    process order, whatever the mesh's device order (see `_process_rows`). Works single- and
    multi-host; with several processes the batch axes ("data", "fsdp") must separate them (each
    row shard lives on one process only).
    """
    n_proc = jax.process_count()
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, x in batch.items():
        x = np.asarray(x)
        if x.ndim and (x.shape[0] * n_proc) % n == 0:
            sh = batch_sharding(mesh)
        elif n_proc == 1:
            sh = NamedSharding(mesh, PartitionSpec())
        else:
            raise ValueError(
                f"batch[{k!r}] has leading dim {x.shape[:1]} per process, not divisible by the "
                f"{n} data*fsdp shards over {n_proc} processes")
        gshape = (x.shape[0] * n_proc, *x.shape[1:]) if sh.spec else x.shape
        # checked first: it names the problem where make_array's own error would not
        where = _process_rows(sh, gshape, x.shape[0], k) if n_proc > 1 else None
        arr = jax.make_array_from_process_local_data(sh, x, gshape)
        if where is not None and not np.array_equal(where, np.arange(gshape[0])):
            arr = _row_gather(tuple(where.tolist()), sh)(arr)
        out[k] = arr
    return out


def _process_rows(sh: NamedSharding, gshape: tuple, local: int, key: str) -> np.ndarray:
    """Global positions of each process's rows, concatenated in process order.

    `make_array_from_process_local_data` fills the row shards a process holds, in increasing
    order, with its local rows. When the mesh puts a process's devices at non-adjacent batch
    shards (a device order that interleaves hosts), its rows are not one block of the global
    array, and pairwise batches (`[chosen, rejected]` per process) would be mis-paired by
    `train.step.gather_process_blocks`; `shard_batch` then permutes rows into process order.
    """
    spans: dict[int, set] = {}
    for d, idx in sh.devices_indices_map(gshape).items():
        r = idx[0]
        spans.setdefault(d.process_index, set()).add(
            (r.start or 0, gshape[0] if r.stop is None else r.stop))
    rows = []
    for p in range(jax.process_count()):
        got = np.concatenate([np.arange(a, b) for a, b in sorted(spans[p])])
        if len(got) != local:
            raise ValueError(
                f"batch[{key!r}]: process {p} holds {len(got)} of the {gshape[0]} global rows but "
                f"loads {local}; the mesh's batch axes (data, fsdp) must split the rows between "
                "processes (each row shard on one process), e.g. no tensor axis across hosts")
        rows.append(got)
    return np.concatenate(rows)


def global_batch(batch: Mapping[str, Any], mesh: Mesh, *, paired: bool = False,
                 tail_key: str | None = None) -> dict[str, jax.Array]:
    """THE entry of per-process data: global jax Arrays, in the loss's row order.

    Each process passes its own rows (`[b_local, ...]` numpy per key), laid out like a whole
    batch: for `paired`, `[chosen n, rejected n, tail m]` (tail: rows flagged by
    `batch[tail_key]` `[m]`, e.g. an algorithm record's extra rows). The result is the batch one
    process would have loaded: all processes' chosen rows (process order), then all rejected
    rows, then all tail rows; the tail flag is split over the batch axes when its length divides
    them, else replicated. One process: `shard_batch`. Steps fed by this function are built with
    `process_blocks=1` (nothing downstream reorders rows).
    """
    n_proc = jax.process_count()
    if n_proc == 1:
        return shard_batch(batch, mesh)
    rows = {k: np.asarray(v) for k, v in batch.items() if k != tail_key}
    out = shard_batch(rows, mesh)
    m = len(batch[tail_key]) if tail_key is not None and tail_key in batch else 0
    if paired:
        b = {len(v) for v in rows.values()}
        if len(b) != 1:
            raise ValueError(f"batch leaves disagree on the number of rows: "
                             f"{ {k: v.shape for k, v in rows.items()} }")
        (b,) = b
        n = (b - m) // 2
        order = [p * b + j for start, size in ((0, n), (n, n), (2 * n, m))
                 for p in range(n_proc) for j in range(start, start + size)]
        out = {k: _row_gather(tuple(order), v.sharding)(v) for k, v in out.items()}
    if m:
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.asarray(batch[tail_key]),
                                                             tiled=True))
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        sh = batch_sharding(mesh) if len(flags) % shards == 0 else NamedSharding(
            mesh, PartitionSpec())
        out[tail_key] = jax.make_array_from_callback(flags.shape, sh, lambda i: flags[i])
    return out


def host_values(x: Any) -> np.ndarray:
    """A numpy copy of `x` on every process (gathered when it spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@functools.lru_cache(maxsize=64)
def _row_gather(where: tuple[int, ...], sh: NamedSharding):
    """Jitted `x -> x[where]` keeping the batch sharding (rows move between hosts on device)."""
    idx = np.asarray(where, np.int32)
    return jax.jit(lambda x: x[idx], out_shardings=sh)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, metrics and exports)."""
    return jax.process_index() == 0


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize` (all None = auto-detect on TPU pods / SLURM)."""
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
