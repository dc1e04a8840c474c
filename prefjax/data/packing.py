"""Packing: the sequences of a right-padded batch laid several to a row, with segment ids.

A padded batch (`collate_pairs` / `collate_sequences`: input_ids, attention_mask, loss_mask
[b, t], right-padded) spends its compute on padding when lengths are ragged. `pack_batch` keeps
every key of it (so the loss still sees the [b, t] / [b] layout it expects) and adds the packed
rows the model runs on instead:

  packed_input_ids    int32 [R, T]  several sequences per row, right-padded with pad_id
  packed_segment_ids  int32 [R, T]  1, 2, ... per sequence within a row; 0 on padding
  packed_positions    int32 [R, T]  0, 1, ... within each sequence (RoPE / learned positions)
  pack_index          int32 [b, t]  flat index into the [R * T] packed tokens of sequence i's
                                    token j (0 where attention_mask is 0)

With `micro_batches = k`, the batch's rows split into k groups exactly as the train step's
`split_microbatches` splits them (paired: the same chosen rows and their rejected partners), each
group is packed into its own r = R / k rows, so chosen and rejected of a pair stay in one
micro-batch and every micro-batch is self-contained: a forward over any whole number of groups
(one micro-batch, or the whole batch) finds its tokens at `pack_index mod (its rows * T)`.
Rows are filled first-fit-decreasing (deterministic); r is the most any group needs, rounded up
to `row_multiple` (fewer distinct shapes, fewer compiles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PACKED_PREFIX = "packed_"
PACKED_KEYS = ("packed_input_ids", "packed_segment_ids", "packed_positions")


def is_packed(batch: Mapping) -> bool:
    return "packed_input_ids" in batch


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= capacity, first-fit-decreasing.

    Ties keep index order, and each bin lists its items by index, so the result is a
    deterministic function of the lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {capacity}")
        for j, free in enumerate(room):
            if n <= free:
                bins[j].append(i)
                room[j] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return [sorted(b) for b in bins]


def micro_batch_groups(b: int, k: int, paired: bool) -> list[np.ndarray]:
    """Row indices of each of the k micro-batches of a [b, ...] batch (as `split_microbatches`:
    paired = chosen rows g*n/k.. with their rejected partners n + g*n/k..; else contiguous)."""
    if paired and b % 2:
        raise ValueError(f"a pairwise batch needs an even number of rows, got {b}")
    n = b // 2 if paired else b
    if n % k:
        raise ValueError(f"grad_accum={k} must divide the {n} {'pairs' if paired else 'rows'} "
                         "of a packed batch")
    m = n // k
    if not paired:
        return [np.arange(g * m, (g + 1) * m) for g in range(k)]
    return [np.concatenate([np.arange(g * m, (g + 1) * m), n + np.arange(g * m, (g + 1) * m)])
            for g in range(k)]


def pack_batch(batch: Mapping[str, np.ndarray], *, pad_id: int, micro_batches: int = 1,
               paired: bool = False, pack_length: int | None = None,
               row_multiple: int = 1) -> dict:
    """`batch` (right-padded [b, t]) plus its packed rows (module docstring).

    pack_length: T, the packed row length (default t, which every sequence fits).
    """
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    b, t = ids.shape
    T = t if pack_length is None else int(pack_length)
    lens = mask.astype(bool).sum(1)
    if not np.array_equal(mask.astype(bool), np.arange(t)[None] < lens[:, None]):
        raise ValueError("pack_batch needs right-padded rows (attention_mask 1...1 0...0)")
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
    groups = micro_batch_groups(b, micro_batches, paired)
    bins = [first_fit([int(lens[i]) for i in g], T) for g in groups]
    r = max(len(x) for x in bins)
    r = -(-r // row_multiple) * row_multiple
    k = micro_batches
    pids = np.full((k * r, T), pad_id, np.int32)
    seg = np.zeros((k * r, T), np.int32)
    pos = np.zeros((k * r, T), np.int32)
    index = np.zeros((b, t), np.int32)
    for g, (rows, packed) in enumerate(zip(groups, bins, strict=True)):
        for j, members in enumerate(packed):
            row, at = g * r + j, 0
            for s, m in enumerate(members, start=1):
                i, n = rows[m], int(lens[rows[m]])
                pids[row, at:at + n] = ids[i, :n]
                seg[row, at:at + n] = s
                pos[row, at:at + n] = np.arange(n)
                index[i, :n] = row * T + at + np.arange(n)
                at += n
    return {**batch, "packed_input_ids": pids, "packed_segment_ids": seg,
            "packed_positions": pos, "pack_index": index}


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
    """Share of the token slots the model computes on that hold padding (packed or not)."""
    real = float(np.sum(np.asarray(batch["attention_mask"])))
    slots = np.asarray(batch["packed_input_ids" if is_packed(batch) else "input_ids"]).size
    return 1.0 - real / max(slots, 1)
