"""BatchLoader: deterministic order, exact resume, per-host sharding, epoch boundaries."""

import json

import datasets
import numpy as np
import pytest

from prefjax.data import BatchLoader


def ids(rows):
    return [r["i"] for r in rows]


def make(n=10, **kw):
    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    kw = {"batch_size": 4, "collate": ids, "seed": 0, **kw}
    return BatchLoader(ds, **kw)


def take(loader, k):
    return [next(loader) for _ in range(k)]


def test_same_seed_same_order_and_each_epoch_a_permutation():
    a, b = take(make(), 6), take(make(), 6)
    assert a == b
    assert take(make(seed=1), 6) != a
    # 10 rows, batch 4, drop_remainder: 2 batches per epoch; each epoch's rows are distinct.
    for e in range(3):
        rows = a[2 * e] + a[2 * e + 1]
        assert len(set(rows)) == 8 and set(rows) <= set(range(10))
    assert a[:2] != a[2:4]  # a fresh permutation each epoch


def test_order_is_numpy_permutation_of_seed_and_epoch():
    order = np.random.default_rng([7, 1]).permutation(10)
    loader = make(seed=7, state={"epoch": 1, "position": 0})
    assert next(loader) == order[:4].tolist()


@pytest.mark.parametrize("consumed", [1, 2, 3, 5])
def test_resume_reproduces_next_batches(consumed):
    ref = make(seed=3)
    expected = take(ref, consumed + 4)[consumed:]
    first = make(seed=3)
    take(first, consumed)
    state = json.loads(json.dumps(first.state()))  # survives a JSON checkpoint
    resumed = make(seed=3)
    resumed.restore(state)
    assert take(resumed, 4) == expected
    assert take(make(seed=3, state=state), 4) == expected


def test_epoch_boundary_and_num_epochs():
    loader = make(num_epochs=2, drop_remainder=False)
    batches = take(loader, 6)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2] and loader.steps_per_epoch == 3
    assert sorted(sum(batches[:3], [])) == list(range(10))
    assert sorted(sum(batches[3:], [])) == list(range(10))
    assert (loader.state()["epoch"], loader.state()["position"]) == (1, 10)
    with pytest.raises(StopIteration):
        next(loader)
    assert list(make(num_epochs=2, drop_remainder=False)) == batches
    # Resuming from the last row of an epoch continues with the next epoch's first batch.
    state = make(state={"epoch": 0, "position": 8}).state()
    assert next(make(state=state)) == next(make(state={"epoch": 1, "position": 0}))


def test_hosts_get_disjoint_slices_of_the_global_batch():
    glob = take(make(n=37, batch_size=8, seed=5), 7)
    hosts = [take(make(n=37, batch_size=8, seed=5, process_index=i, process_count=4), 7)
             for i in range(4)]
    for step, batch in enumerate(glob):
        parts = [h[step] for h in hosts]
        for i, part in enumerate(parts):
            assert part == batch[2 * i: 2 * (i + 1)]
        assert sum(parts, []) == batch and len(set(sum(parts, []))) == 8


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="multiple of process_count"):
        make(batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make(n=3)
    with pytest.raises(ValueError, match="seed=1.*this loader has 0"):
        make(state={"epoch": 0, "position": 4, "seed": 1})
    with pytest.raises(ValueError, match="invalid loader state"):
        make(state={"epoch": 0, "position": 11})


def test_plain_list_dataset():
    rows = [{"i": i} for i in range(8)]
    loader = BatchLoader(rows, batch_size=4, collate=ids, seed=0)
    assert sorted(next(loader) + next(loader)) == list(range(8))
