"""Precompute reference log-probs once and store them as dataset columns (no reference model later).

`logps_fn` is any callable `batch -> [k * n]` (the trainer passes a jitted reference-model
function); nothing here imports a model. Batches always have exactly `batch_size` rows (the last
one is filled by repeating its final row and the extra outputs are discarded), so a jitted
`logps_fn` compiles once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def add_reference_logps(
    dataset: datasets.Dataset,
    logps_fn: Callable[[Any], Any],
    *,
    batch_size: int,
    collate: Callable[[list[Mapping]], Any],
    columns: Sequence[str] = PAIR_COLUMNS,
) -> datasets.Dataset:
    """Return `dataset` plus float32 columns `columns` from `logps_fn(collate(rows))`.

    For pairs (`collate_pairs`), `logps_fn` returns `[2n]`: chosen rows first, then rejected, and
    the columns are `ref_chosen_logps`, `ref_rejected_logps`. For single sequences
    (`collate_sequences`) pass `columns=("ref_logps",)` and return `[n]`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clash = [c for c in columns if c in dataset.column_names]
    if clash:
        raise ValueError(f"dataset already has columns {clash}; remove them to recompute")
    n, k = len(dataset), len(columns)
    out = np.zeros((k, n), np.float32)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        real = len(idx)
        idx += [idx[-1]] * (batch_size - real)  # static shapes: pad with a repeated row
        cols = dataset[idx]
        rows = [{c: cols[c][j] for c in cols} for j in range(batch_size)]
        logps = np.asarray(logps_fn(collate(rows)), np.float64)
        if logps.shape != (k * batch_size,):
            raise ValueError(f"logps_fn returned shape {logps.shape}; expected ({k * batch_size},)"
                             f" = {k} x batch_size for columns {list(columns)}")
        if not np.all(np.isfinite(logps)):
            bad = int(np.flatnonzero(~np.isfinite(logps))[0]) % batch_size
            raise ValueError(
                f"logps_fn returned a non-finite log-prob for dataset row {start + bad}")
        out[:, start:start + real] = logps.reshape(k, batch_size)[:, :real]
    for name, values in zip(columns, out):
        dataset = dataset.add_column(name, values.tolist(), feature=datasets.Value("float32"))
    log.info("added reference log-probs %s for %d rows", list(columns), n)
    return dataset
