"""add_reference_logps with a fake log-prob function: values land in the right rows and columns."""

import functools

import datasets
import numpy as np
import pytest

from prefjax.data import add_reference_logps, collate_pairs, collate_sequences


def fake_logps(batch, calls):
    """A deterministic stand-in for a model: -sum of scored token ids / 10, per row."""
    calls.append(batch["input_ids"].shape)
    return -(batch["input_ids"] * batch["loss_mask"]).sum(-1) / 10.0


def pair_rows(n):
    rng = np.random.default_rng(0)
    return [{"prompt_ids": [1, int(rng.integers(3, 9))],
             "chosen_ids": rng.integers(3, 50, size=rng.integers(1, 5)).tolist() + [2],
             "rejected_ids": rng.integers(3, 50, size=rng.integers(1, 5)).tolist() + [2]}
            for _ in range(n)]


def test_pairs_columns_match_per_row_values_and_shapes_are_static():
    rows = pair_rows(7)
    ds = datasets.Dataset.from_list(rows)
    calls = []
    collate = functools.partial(collate_pairs, pad_id=0, seq_len=12)
    out = add_reference_logps(ds, functools.partial(fake_logps, calls=calls), batch_size=3,
                              collate=collate)
    assert calls == [(6, 12)] * 3  # 7 rows in batches of 3: the last is padded, not smaller
    for r, got in zip(rows, out):
        np.testing.assert_allclose(got["ref_chosen_logps"], -sum(r["chosen_ids"]) / 10, rtol=1e-6)
        np.testing.assert_allclose(got["ref_rejected_logps"], -sum(r["rejected_ids"]) / 10,
                                   rtol=1e-6)
    batch = collate([out[i] for i in range(2)])
    np.testing.assert_allclose(batch["ref_logps"], fake_logps(batch, []), rtol=1e-6)


def test_sequences_single_column():
    rows = [{"prompt_ids": [1], "completion_ids": [5 + i, 2]} for i in range(5)]
    out = add_reference_logps(
        datasets.Dataset.from_list(rows), functools.partial(fake_logps, calls=[]), batch_size=2,
        collate=functools.partial(collate_sequences, pad_id=0, seq_len=4), columns=("ref_logps",))
    np.testing.assert_allclose(out["ref_logps"][:], [-(7 + i) / 10 for i in range(5)], rtol=1e-6)


def test_wrong_shape_non_finite_and_existing_columns():
    ds = datasets.Dataset.from_list(pair_rows(4))
    collate = functools.partial(collate_pairs, pad_id=0, seq_len=12)
    with pytest.raises(ValueError, match=r"shape \(2,\); expected \(4,\)"):
        add_reference_logps(ds, lambda b: np.zeros(2), batch_size=2, collate=collate)

    def nan_at_row_3(b):
        out = np.zeros(4)
        if b["input_ids"][1, 1] == ds[3]["prompt_ids"][1]:
            out[1] = np.nan
        return out

    with pytest.raises(ValueError, match="non-finite log-prob for dataset row 3"):
        add_reference_logps(ds, nan_at_row_3, batch_size=2, collate=collate)
    done = add_reference_logps(ds, lambda b: np.zeros(4), batch_size=2, collate=collate)
    with pytest.raises(ValueError, match="already has columns"):
        add_reference_logps(done, lambda b: np.zeros(4), batch_size=2, collate=collate)
