"""Reference log-prob columns: sharded pass equals the per-row reference, the disk cache is hit
on a second call (zero forward passes) and missed when the reference, data or collate changes."""

from __future__ import annotations

import functools
import json

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

from prefjax.data import collate_pairs, collate_sequences
from prefjax.models.llama import LlamaConfig
from prefjax.parallel import make_mesh
from prefjax.train.refcache import (
    data_identity,
    folder_identity,
    reference_identity,
    reference_logps_columns,
)
from tests.train.tiny_model import VOCAB, forward, tiny_model


def mesh1():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def mesh8():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])


def pair_rows(n, seed=0):
    r = np.random.default_rng(seed)
    return [{"prompt_ids": r.integers(1, VOCAB, r.integers(1, 4)).tolist(),
             "chosen_ids": r.integers(1, VOCAB, r.integers(1, 5)).tolist(),
             "rejected_ids": r.integers(1, VOCAB, r.integers(1, 5)).tolist()} for _ in range(n)]


def reference(seed=0):
    with nnx.use_eager_sharding(False):
        return nnx.jit(lambda: tiny_model(nnx.Rngs(seed)))()


COLLATE = functools.partial(collate_pairs, pad_id=0, seq_len=10)


class Counter:
    """Wraps the test's independent forward; counts executed forward passes and traces."""

    def __init__(self):
        self.runs, self.traces = 0, 0

    def __call__(self, model, batch):
        self.traces += 1
        jax.debug.callback(self.bump)
        return forward(model, batch).logps

    def bump(self):
        self.runs += 1


@nnx.jit
def scored(model, batch):
    return forward(model, batch).logps


def per_row(rows, model, collate=COLLATE):
    """Each row scored alone on one device, unpadded by other rows: the independent reference."""
    return np.asarray([np.asarray(scored(model, dict(collate([r])))) for r in rows])


def test_sharded_columns_equal_per_row_logps_on_1_and_8_devices():
    rows = pair_rows(11)
    ds, ref = datasets.Dataset.from_list(rows), reference()
    want = per_row(rows, ref)
    got = {}
    for name, mesh in (("1", mesh1()), ("8", mesh8())):
        count = Counter()
        out = reference_logps_columns(ds, ref, mesh=mesh, collate=COLLATE, batch_size=4,
                                      logps=count)
        assert count.traces == 1  # every batch (the last one padded) has the same shapes
        got[name] = np.stack([out["ref_chosen_logps"], out["ref_rejected_logps"]], 1)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["8"], got["1"], rtol=1e-5)


def test_default_logps_path_and_sequences():
    """Without `logps`, the model's own `policy_out` scores rows; single-sequence columns."""
    rows = [{"prompt_ids": [1, 2], "completion_ids": [3 + i, 4]} for i in range(5)]
    collate = functools.partial(collate_sequences, pad_id=0, seq_len=6)
    ref = reference()
    out = reference_logps_columns(datasets.Dataset.from_list(rows), ref, mesh=mesh8(),
                                  collate=collate, batch_size=2, columns=("ref_logps",))
    np.testing.assert_allclose(out["ref_logps"][:], per_row(rows, ref, collate)[:, 0],
                               rtol=1e-5, atol=1e-6)


def test_cache_hit_then_miss_when_reference_data_or_truncation_change(tmp_path):
    rows = pair_rows(9)
    ds, ref = datasets.Dataset.from_list(rows), reference()
    cache = tmp_path / "ref_logps"
    ident = reference_identity({"tiny": "model"}, seed=0)

    count, mesh = Counter(), mesh1()

    def run(data=ds, model=ref, identity=ident, collate=COLLATE, settings=None):
        before = count.runs
        out = reference_logps_columns(data, model, mesh=mesh, collate=collate,
                                      batch_size=4, cache_dir=cache, identity=identity,
                                      settings=settings, logps=count)
        return out, count.runs - before

    first, runs = run()
    assert runs == 3  # 9 rows in batches of 4
    (key_dir,) = [p for p in cache.iterdir()]
    assert not key_dir.name.startswith(".")  # no temporary folder left behind
    assert json.loads((key_dir / "meta.json").read_text())["rows"] == 9
    def never():
        raise AssertionError("a cache hit must not build the reference")

    again, runs = run(model=never)
    assert runs == 0  # a restart reads the cache: zero forward passes, no reference loaded
    for c in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_array_equal(again[c], first[c])

    # (a) another reference
    other = reference(seed=1)
    out, runs = run(model=other, identity=reference_identity({"tiny": "model"}, seed=1))
    assert runs == 3
    np.testing.assert_allclose(np.stack([out["ref_chosen_logps"], out["ref_rejected_logps"]], 1),
                               per_row(rows, other), rtol=1e-5, atol=1e-6)
    # (b) one token changed
    changed = [dict(r) for r in rows]
    changed[5] = {**changed[5], "chosen_ids": changed[5]["chosen_ids"] + [3]}
    assert run(data=datasets.Dataset.from_list(changed))[1] == 3
    # (c) truncation / collate settings
    assert run(collate=functools.partial(collate_pairs, pad_id=0, seq_len=12))[1] == 3
    assert run(settings={"max_length": 10, "over_long": "drop"})[1] == 3
    # every variant is now cached
    assert run(model=other, identity=reference_identity({"tiny": "model"}, seed=1))[1] == 0
    assert run(settings={"max_length": 10, "over_long": "drop"})[1] == 0
    assert len([p for p in cache.iterdir()]) == 5


def test_identities(tmp_path):
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    assert reference_identity(cfg, seed=0) == reference_identity(cfg, seed=0)
    assert reference_identity(cfg, seed=0) != reference_identity(cfg, seed=1)
    assert reference_identity(cfg, seed=0) != reference_identity(cfg, seed=0, dtype="bfloat16")
    with pytest.raises(ValueError, match="seed"):
        reference_identity(cfg)
    # an HF folder is identified by its contents, wherever it lives
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
        (d / "README.md").write_text(str(d))  # not part of the weights
    assert folder_identity(a) == folder_identity(b) == reference_identity(str(a))
    (b / "model.safetensors").write_bytes(bytes(range(256)) * 999 + bytes([1]) * 256)
    assert folder_identity(a) != folder_identity(b)
    (b / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (b / "config.json").write_text('{"x": 2}')
    assert folder_identity(a) != folder_identity(b)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        folder_identity(tmp_path)
    # the data identity follows the token ids and their order, not how the dataset was made
    rows = pair_rows(6)
    ds = datasets.Dataset.from_list(rows)
    assert data_identity(ds) == data_identity(datasets.Dataset.from_list(rows))
    assert data_identity(ds.select([1, 0, 2, 3, 4, 5])) != data_identity(ds)
    assert data_identity(ds.select(range(3))) == data_identity(
        datasets.Dataset.from_list(rows[:3]))
    moved = [dict(r) for r in rows]  # a token moved from the prompt to the response
    moved[0] = {**moved[0], "prompt_ids": moved[0]["prompt_ids"][:-1],
                "chosen_ids": moved[0]["prompt_ids"][-1:] + moved[0]["chosen_ids"]}
    assert data_identity(datasets.Dataset.from_list(moved)) != data_identity(ds)
