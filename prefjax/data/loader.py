"""Deterministic, resumable, per-host sharded batches over a dataset.

Epoch `e` visits the rows in the order `np.random.default_rng([seed, e]).permutation(len(ds))`,
so the order depends only on (seed, epoch): any host, any restart, same order. A global batch is
`batch_size` consecutive entries of that order; host `i` of `P` takes rows
`[i * B/P, (i+1) * B/P)` of it. The state is `{"epoch", "position"}` (position = rows of the
epoch's order already consumed by all hosts together), JSON-serialisable, so a checkpoint can
carry it and `restore` reproduces exactly the batches that would have come next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np


class BatchLoader(Iterator):
    """Iterate `collate(rows)` over global batches of `dataset`, this host's slice only.

    dataset: a `datasets.Dataset` or any sequence of row mappings.
    collate: `rows (list of dicts) -> batch`, e.g. `partial(collate_pairs, pad_id=0, seq_len=64)`.
    num_epochs: None loops forever. drop_remainder=False also yields the last, smaller global batch
    (split across hosts as evenly as possible, so shapes may differ between hosts).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        collate: Callable[[list[Mapping]], Any],
        seed: int,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        state: Mapping | None = None,
    ):
        n = len(dataset)
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"process_count ({process_count})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
        if n == 0 or (drop_remainder and n < batch_size):
            raise ValueError(f"dataset has {n} rows, fewer than one global batch of {batch_size}"
                             + (" (drop_remainder=True)" if n else ""))
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.num_epochs, self.drop_remainder = seed, num_epochs, drop_remainder
        self.process_index, self.process_count = process_index, process_count
        self._n = n
        self._epoch, self._position = 0, 0
        if state is not None:
            self.restore(state)

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        full, rest = divmod(self._n, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def state(self) -> dict:
        """Where the next batch starts: `{"epoch", "position", "seed", "num_rows"}` (JSON-safe)."""
        return {"epoch": self._epoch, "position": self._position, "seed": int(self.seed),
                "num_rows": self._n}

    def restore(self, state: Mapping) -> None:
        """Continue from a `state()`; the next batches equal those that followed it originally."""
        for key, mine in (("seed", self.seed), ("num_rows", self._n)):
            if key in state and int(state[key]) != int(mine):
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine}; "
                                 "resuming would not reproduce the same batches")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self._n:
            raise ValueError(f"invalid loader state {dict(state)} for {self._n} rows")
        self._epoch, self._position = epoch, position

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices `[n]` in the order epoch `epoch` visits them."""
        return np.random.default_rng([int(self.seed), int(epoch)]).permutation(self._n)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Any:
        remaining = self._n - self._position
        if remaining == 0 or (self.drop_remainder and remaining < self.batch_size):
            self._epoch, self._position = self._epoch + 1, 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        size = min(self.batch_size, self._n - self._position)
        rows = self.epoch_order(self._epoch)[self._position:self._position + size]
        self._position += size
        mine = np.array_split(rows, self.process_count)[self.process_index]
        return self.collate(_take(self.dataset, mine))


def _take(dataset: Any, indices: np.ndarray) -> list[Mapping]:
    idx = [int(i) for i in indices]
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        cols = dataset[idx]  # one columnar read instead of len(idx) row reads
        keys = list(cols)
        return [{k: cols[k][j] for k in keys} for j in range(len(idx))]
    return [dataset[i] for i in idx]
