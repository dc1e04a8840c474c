"""Precomputed reference log-probs: one jitted, mesh-sharded pass, cached on disk in the workdir.

`reference_logps_columns` scores every row of a tokenized dataset with the frozen reference
(parameters placed by their logical shardings, each batch split over the mesh's batch axes, one
compile for all batches) and adds the columns `add_reference_logps` would. With `cache_dir` the
values are stored under `cache_dir/<key>/` (written whole to a temporary folder, then renamed;
only process 0 writes), where the key hashes (a) the reference weights' identity
(`reference_identity`: a content hash of an HF folder, or a random init's config + seed), (b) the
token ids of the dataset (`data_identity`), (c) the collate / truncation settings. A restart or
resume with the same three reuses the values without a forward pass; a change of any misses.

Multi-host: every process holds the whole dataset; each batch of `n` rows is split into equal
per-process blocks (process p collates rows `p*n/P ..`), `parallel.global_batch` makes them the
global array one process would collate (row for row, so the values are bitwise those of one
process), and the result is replicated, so every process ends with the same columns for all rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import parallel
from prefjax.data.reference import PAIR_COLUMNS
from prefjax.paths import as_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored layout or the meaning of a key input changes
_BLOCK = 16 << 20  # bytes hashed per read: large files stream, never load whole


def _digest(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no ambiguous concatenation
        h.update(b)
    return h.hexdigest()


def _json(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def folder_identity(path: str | os.PathLike) -> str:
    """Content hash of an HF model folder: config.json and every *.safetensors file (by name,
    size and bytes, streamed in 16 MB blocks), so a copy elsewhere has the same identity and
    any changed weight gives another."""
    root = as_path(path)
    files = sorted(f for f in root.iterdir()
                   if f.name == "config.json" or f.name.endswith(".safetensors"))
    if not any(f.name.endswith(".safetensors") for f in files):
        raise FileNotFoundError(f"{root}: no *.safetensors files to identify the reference by")
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(_digest(f.name, str(f.stat().length)).encode())
        with f.open("rb") as fh:
            while block := fh.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def init_identity(config: Any, seed: int) -> str:
    """Identity of a randomly initialised model: its config (a dataclass or mapping) + seed."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return _digest("init", _json(cfg), str(int(seed)))


def reference_identity(source: Any, *, seed: int | None = None, **settings) -> str:
    """The reference weights' identity: `folder_identity` for an HF folder path, else
    `init_identity(source, seed)` for a random init's config. `settings` (e.g. dtype="bfloat16",
    which changes the log-probs) are folded in."""
    if isinstance(source, str | os.PathLike) and as_path(source).is_dir():
        base = folder_identity(source)
    else:
        if seed is None:
            raise ValueError("reference_identity of a model config needs the init seed")
        base = init_identity(source, seed)
    return _digest(base, _json(settings)) if settings else base


def data_identity(dataset: datasets.Dataset, columns: Sequence[str] | None = None) -> str:
    """Order-sensitive hash of the token-id columns (default: every `*_ids` column).

    Hashes the values, not `dataset._fingerprint` (random for in-memory datasets and dependent
    on how the dataset was made), so the same rows give the same identity in every process and
    run. Truncation is applied at tokenization, so it shows in these ids too.
    """
    names = sorted(columns or [c for c in dataset.column_names if c.endswith("_ids")])
    if not names:
        raise ValueError(f"dataset has no token-id columns to identify it by; columns: "
                         f"{dataset.column_names}")
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.select_columns(names).with_format("arrow")[:]
    parts: list[bytes | str] = [str(len(dataset))]
    for name in names:
        col = table.column(name).combine_chunks()
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
            raise ValueError(f"column {name!r} is not a list of token ids ({col.type})")
        lengths = np.asarray(pc.list_value_length(col).fill_null(0), np.int64)
        values = np.asarray(pc.list_flatten(col), np.int64)
        parts += [name, lengths.tobytes(), values.tobytes()]
    return _digest(*parts)


def collate_settings(collate: Callable) -> dict:
    """What a `functools.partial` collate fixes (function, pad id, seq_len), for the key."""
    if isinstance(collate, functools.partial):
        return {"fn": getattr(collate.func, "__qualname__", repr(collate.func)),
                "args": [repr(a) for a in collate.args], **collate.keywords}
    return {"fn": getattr(collate, "__qualname__", repr(collate))}


def cache_key(identity: str, data: str, settings: Mapping[str, Any]) -> str:
    """The folder name under `cache_dir` for these three inputs."""
    return _digest(f"v{CACHE_VERSION}", identity, data, _json(dict(settings)))


def reference_logps_columns(
    dataset: datasets.Dataset,
    reference: nnx.Module | Callable[[], nnx.Module],
    *,
    mesh: Mesh,
    collate: Callable[[list[Mapping]], Mapping[str, np.ndarray]],
    batch_size: int,
    columns: Sequence[str] = PAIR_COLUMNS,
    chunk: int | None = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
    cache_dir: str | os.PathLike | None = None,
    identity: str | None = None,
    settings: Mapping[str, Any] | None = None,
    logps: Callable[[nnx.Module, Mapping], jax.Array] | None = None,
) -> datasets.Dataset:
    """`dataset` plus float32 columns `columns` of reference log-probs (as `add_reference_logps`).

    reference: the frozen model, or `() -> model` (called only on a cache miss, so a resumed
        run with cached values never loads it).
    collate: rows -> `[k * n, t]` batch (k = len(columns); pairs: chosen rows, then rejected).
    batch_size: rows per global batch, rounded up so every process and batch shard gets an
        equal block; the last batch is padded by repeating its final row (one compile).
    chunk: vocabulary chunk of the log-softmax (changes memory, not values; not in the key).
    cache_dir: e.g. `workdir/ref_logps`; None disables caching. identity: the reference's
        `reference_identity` (required with cache_dir). settings: more key inputs, e.g. the
        truncation policy (the collate's own settings are added automatically).
    logps: `(model, batch) -> [k * n]`; default `prefjax.lm.policy_out(...).logps`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clash = [c for c in columns if c in dataset.column_names]
    if clash:
        raise ValueError(f"dataset already has columns {clash}; remove them to recompute")
    key_dir = None
    if cache_dir is not None:
        if not identity:
            raise ValueError("reference_logps_columns(cache_dir=...) needs identity= (the "
                             "reference's `reference_identity`)")
        key = cache_key(identity, data_identity(dataset),
                        {"collate": collate_settings(collate), "columns": list(columns),
                         **(settings or {})})
        key_dir = as_path(cache_dir) / key
    values = _load(key_dir, len(dataset), columns) if key_dir is not None else None
    if parallel.process_count() > 1 and key_dir is not None:
        from jax.experimental import multihost_utils

        hit = int(multihost_utils.broadcast_one_to_all(np.int32(values is not None)))
        if hit and values is None:
            raise FileNotFoundError(f"process 0 found the reference log-prob cache {key_dir} "
                                    f"but process {parallel.process_index()} cannot read it")
        values = values if hit else None
    if values is None:
        model = reference if isinstance(reference, nnx.Module) else reference()
        values = _compute(dataset, model, mesh=mesh, collate=collate, batch_size=batch_size,
                          k=len(columns), chunk=chunk, rules=rules, logps=logps)
        if key_dir is not None and parallel.is_main_process():
            _store(key_dir, values, columns)
    else:
        log.info("reference log-probs %s for %d rows read from %s", list(columns),
                 len(dataset), key_dir)
    for name, v in zip(columns, values):
        dataset = dataset.add_column(name, v.tolist(), feature=datasets.Value("float32"))
    return dataset


def _compute(dataset, reference, *, mesh, collate, batch_size, k, chunk, rules,
             logps) -> np.ndarray:
    """`[k, n]` float32 log-probs of every row, one jitted sharded call per batch."""
    graphdef, weights = nnx.split(reference)
    weights = jax.device_put(weights, parallel.param_shardings(weights, mesh, rules))
    run = _runner(graphdef, logps, chunk, NamedSharding(mesh, PartitionSpec()))

    n_proc, me = parallel.process_count(), parallel.process_index()
    if n_proc > 1 and k > 2:
        raise NotImplementedError(f"reference log-probs of {k} row groups over several processes")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    step = shards // math.gcd(shards, k * n_proc)  # k * n_local * n_proc rows split evenly
    n_local = -(-max(1, -(-batch_size // n_proc)) // step) * step
    n_batch, total = n_local * n_proc, len(dataset)
    out = np.zeros((k, total), np.float32)
    for start in range(0, total, n_batch):
        real = min(n_batch, total - start)
        idx = [start + min(i, real - 1) for i in range(n_batch)]  # pad: repeat the last row
        mine = idx[me * n_local:(me + 1) * n_local]
        cols = dataset[mine]
        rows = [{c: cols[c][j] for c in cols} for j in range(n_local)]
        batch = {key: v for key, v in collate(rows).items()
                 if key in ("input_ids", "attention_mask", "loss_mask")}
        # the rows of one process's layout (`[k, n]` column-major groups), so each row sits where
        # a single process puts it: a row's log-prob may round differently elsewhere
        got = np.asarray(run(weights, parallel.global_batch(batch, mesh, paired=k == 2)),
                         np.float64)
        if got.shape != (k * n_batch,):
            raise ValueError(f"reference log-probs have shape {got.shape}; expected "
                             f"({k * n_batch},) = {k} columns x {n_batch} rows")
        got = got.reshape(k, n_batch)
        if not np.all(np.isfinite(got[:, :real])):
            bad = int(np.flatnonzero(~np.isfinite(got[:, :real]))[0]) % real
            raise ValueError(f"non-finite reference log-prob for dataset row {start + bad}")
        out[:, start:start + real] = got[:, :real]
    log.info("computed reference log-probs for %d rows (%d per batch over %d process(es))",
             total, n_batch, n_proc)
    return out


@functools.lru_cache(maxsize=8)
def _runner(graphdef, logps, chunk, replicated):
    """Jitted `(weights, batch) -> [k * n]` replicated log-probs (one per model and settings,
    so the train and eval sets share a compile)."""
    if logps is None:
        from prefjax.lm import policy_out

        def logps(model, batch):
            return policy_out(model, batch, chunk_size=chunk).logps

    @functools.partial(jax.jit, out_shardings=replicated)
    def run(weights, batch):
        return logps(nnx.merge(graphdef, weights), batch)

    return run


def _load(key_dir, n: int, columns: Sequence[str]) -> np.ndarray | None:
    meta_path = key_dir / "meta.json"
    if not meta_path.exists():  # written last: its presence means the folder is complete
        return None
    meta = json.loads(meta_path.read_text())
    values = np.load(io.BytesIO((key_dir / "logps.npy").read_bytes()))
    if meta.get("columns") != list(columns) or values.shape != (len(columns), n):
        log.warning("ignoring reference log-prob cache %s: it holds %s %s, need %s for %d rows",
                    key_dir, meta.get("columns"), values.shape, list(columns), n)
        return None
    return values.astype(np.float32)


def _store(key_dir, values: np.ndarray, columns: Sequence[str]) -> None:
    """Write to `<key>.tmp-<uuid>/` and rename it to `<key>/` (a reader never sees half)."""
    tmp = key_dir.parent / f".{key_dir.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True, exist_ok=False)
    buf = io.BytesIO()
    np.save(buf, values.astype(np.float32))
    (tmp / "logps.npy").write_bytes(buf.getvalue())
    (tmp / "meta.json").write_text(json.dumps({"columns": list(columns),
                                               "rows": int(values.shape[1]),
                                               "version": CACHE_VERSION}))
    try:
        tmp.rename(key_dir)
    except OSError:  # another writer got there first: theirs holds the same values
        tmp.rmtree()
        if not (key_dir / "meta.json").exists():
            raise
    log.info("cached reference log-probs in %s", key_dir)
