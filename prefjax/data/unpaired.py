"""Unpaired (prompt, completion, label) data: the synthetic version, the mismatched-completion
rows that estimate a KL reference point, and collation (data kind "unpaired").

A batch of n rows is `[2n, t]`: rows [:n] prompt_i + completion_i, rows [n:2n] prompt_i +
kl_completion_i, another row's completion (TRL's KTOTrainer: completions rotated by one inside
each block of `block` consecutive rows, (x_1, y_n), (x_2, y_1), .., (x_n, y_{n-1}), before
shuffling). `labels` [2n] float32 (1 desirable; the second half repeats the first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from prefjax.data import synthetic as syn
from prefjax.data.preference import prepare_preference_data
from prefjax.data.tokenize import _ref, _right_pad

REF_COLUMNS = ("ref_logps", "ref_kl_logps")


def make_unpaired_dataset(n: int, seed: int, labeling: str = "bt") -> datasets.Dataset:
    """`n` unpaired rows (format unpaired) from the synthetic task's preference pairs: the chosen
    response labelled desirable, the rejected undesirable (as TRL converts paired data), rows
    shuffled so a block mixes prompts and labels; a `reward` column holds r*."""
    pairs = syn.make_preference_dataset((n + 1) // 2, seed, labeling=labeling)
    rows: dict[str, list] = {"prompt": [], "completion": [], "label": [], "reward": []}
    for r in pairs:
        for key, label in (("chosen", True), ("rejected", False)):
            rows["prompt"].append(r["prompt"])
            rows["completion"].append(r[key])
            rows["label"].append(label)
            rows["reward"].append(r[f"{key}_reward"])
    order = np.random.default_rng([seed, 3]).permutation(len(rows["prompt"]))[:n]
    rows = {k: [v[i] for i in order] for k, v in rows.items()}
    return prepare_preference_data(
        datasets.Dataset.from_dict(rows),
        source=f"synthetic:unpaired(n={n}, seed={seed}, labeling={labeling})", format="unpaired")


def with_kl_completions(ds: datasets.Dataset, block: int) -> datasets.Dataset:
    """`ds` (tokenized: completion_ids) plus `kl_completion_ids`: the completions rotated by one
    inside each block of `block` consecutive rows (a last partial block rotates alone)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")

    def rotate(batch):
        c = batch["completion_ids"]
        return {"kl_completion_ids": [c[-1]] + c[:-1]}

    return ds.map(rotate, batched=True, batch_size=block, desc="KL completions")


def collate_unpaired(rows: Sequence[Mapping], *, pad_id: int, seq_len: int | Sequence[int]
                     ) -> dict:
    """Unpaired rows -> right-padded `[2n, t]` batch (module docstring) with `labels` [2n], and
    ref_logps [2n] when rows carry the `REF_COLUMNS`."""
    for r in rows[:1]:
        if "kl_completion_ids" not in r:
            raise ValueError("unpaired rows need 'kl_completion_ids' (the mismatched "
                             "completions): add them with prefjax.data.unpaired."
                             "with_kl_completions")
    parts = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    parts += [(r["prompt_ids"], r["kl_completion_ids"]) for r in rows]
    out = _right_pad(parts, pad_id, seq_len)
    labels = np.asarray([float(bool(r["label"])) for r in rows], np.float32)
    out["labels"] = np.concatenate([labels, labels])
    if rows and REF_COLUMNS[0] in rows[0]:
        out["ref_logps"] = np.asarray([_ref(r, REF_COLUMNS[0]) for r in rows]
                                      + [_ref(r, REF_COLUMNS[1]) for r in rows], np.float32)
    return out
