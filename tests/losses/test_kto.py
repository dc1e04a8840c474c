"""KTO vs float64 NumPy (values, gradients), limiting cases, and the unpaired data path
(mismatched completions, collation)."""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.data import unpaired
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np
from tests.losses import reference_np_pg as np_pg

RTOL, ATOL = 1e-5, 1e-6


def data(seed, n=6):
    r = np.random.default_rng(seed)
    pi = (-5 - 3 * r.random(2 * n)).astype(np.float32)
    ref = (pi + r.normal(size=2 * n)).astype(np.float32)
    labels = (r.random(n) < 0.5).astype(np.float32)
    labels[:2] = (1, 0)
    return pi, ref, labels


def call(pi, ref, labels, **hp):
    pi = jnp.asarray(pi)
    out = PolicyOut(jnp.zeros((len(pi), 3), pi.dtype), pi, jnp.ones(len(pi)))
    batch = {"ref_logps": jnp.asarray(ref, pi.dtype),
             "labels": jnp.concatenate([jnp.asarray(labels)] * 2)}
    return losses.get("kto", **hp)(out, batch)


CASES = [dict(), dict(beta=0.5), dict(beta=0.2, desirable_weight=1.33, undesirable_weight=0.7)]


@pytest.mark.parametrize("hp", CASES, ids=["defaults", "beta", "weights"])
@pytest.mark.parametrize("kl_positive", [True, False])
def test_loss_and_gradient_match_numpy(hp, kl_positive):
    pi, ref, labels = data(0)
    n = len(labels)
    ref[n:] = pi[n:] + (-0.7 if kl_positive else 0.7)  # z = 0.7, or clamped to 0
    kw = dict(beta=hp.get("beta", 0.1), wd=hp.get("desirable_weight", 1.0),
              wu=hp.get("undesirable_weight", 1.0))
    loss, m = call(pi, ref, labels, **hp)
    np.testing.assert_allclose(loss, np_pg.kto(pi, ref, labels, **kw), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["kl"], 0.7 if kl_positive else 0.0, rtol=1e-5)
    good = labels > 0
    np.testing.assert_allclose(m["rewards/chosen"], kw["beta"] * np.mean((pi - ref)[:n][good]),
                               rtol=1e-5)
    with jax.enable_x64(True):
        g = jax.grad(lambda x: call(x, ref, labels, **hp)[0])(jnp.asarray(pi, jnp.float64))
    # the KL reference point z is detached (TRL): differentiate the labelled rows with z fixed
    fd = ref_np.central_diff(lambda x: np_pg.kto(np.concatenate([x, pi[n:]]), ref, labels, **kw),
                             pi[:n].astype(np.float64))
    np.testing.assert_allclose(np.asarray(g)[:n], fd, rtol=1e-6, atol=1e-10)
    assert np.all(np.asarray(g)[n:] == 0)


def test_all_desirable_data():
    """Every row desirable: loss = w_d mean(1 - sigma(beta (r - z))); raising any log pi lowers
    it; the rejected metrics are 0 (no undesirable rows), not NaN."""
    pi, ref, labels = data(1)
    labels[:] = 1
    loss, m = call(pi, ref, labels, desirable_weight=2.0)
    n = len(labels)
    z = max(0.0, float(np.mean(pi[n:].astype(np.float64) - ref[n:])))
    r = pi[:n].astype(np.float64) - ref[:n]
    np.testing.assert_allclose(loss, 2.0 * np.mean(1 - 1 / (1 + np.exp(-0.1 * (r - z)))),
                               rtol=1e-6)
    g = jax.grad(lambda x: call(x, ref, labels)[0])(jnp.asarray(pi))
    assert np.all(np.asarray(g)[:n] < 0)
    assert float(m["rewards/rejected"]) == 0 and float(m["count/rejected"]) == 0


def test_policy_equal_to_reference_gives_half_weighted_loss():
    pi, _, labels = data(2)
    loss, m = call(pi, pi, labels, desirable_weight=1.0, undesirable_weight=3.0)
    np.testing.assert_allclose(loss, np.mean(np.where(labels > 0, 0.5, 1.5)), rtol=1e-6)
    assert float(m["kl"]) == 0


def test_kto_needs_labels_and_reference():
    pi, ref, labels = data(3)
    out = PolicyOut(jnp.zeros((12, 2)), jnp.asarray(pi), jnp.ones(12))
    with pytest.raises(ValueError, match="labels"):
        losses.get("kto")(out, {"ref_logps": jnp.asarray(ref)})
    with pytest.raises(ValueError, match="ref_logps"):
        losses.get("kto")(out, {"labels": jnp.ones(12)})
    with pytest.raises(ValueError, match="beta"):
        losses.get("kto", beta=0.0)


def test_mismatched_completions_rotate_inside_blocks_and_collate():
    ds = datasets.Dataset.from_dict({"prompt_ids": [[1, i] for i in range(5)],
                                     "completion_ids": [[10 + i, 2] for i in range(5)],
                                     "label": [True, False, True, True, False]})
    out = unpaired.with_kl_completions(ds, block=2)
    # blocks [0, 1], [2, 3], [4]: (x_1, y_n), (x_2, y_1), ...
    assert [r[0] for r in out["kl_completion_ids"]] == [11, 10, 13, 12, 14]
    rows = [{**r, "ref_logps": -1.0 - i, "ref_kl_logps": -10.0 - i} for i, r in enumerate(out)]
    b = unpaired.collate_unpaired(rows[:2], pad_id=0, seq_len=6)
    np.testing.assert_array_equal(b["input_ids"][:, :4],
                                  [[1, 0, 10, 2], [1, 1, 11, 2], [1, 0, 11, 2], [1, 1, 10, 2]])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["labels"], [1, 0, 1, 0])
    np.testing.assert_array_equal(b["ref_logps"], [-1, -2, -10, -11])


def test_synthetic_unpaired_dataset_labels_chosen_desirable():
    ds = unpaired.make_unpaired_dataset(40, seed=0)
    assert len(ds) == 40 and set(ds.column_names) >= {"prompt", "completion", "label"}
    good = np.array(ds["reward"])[np.array(ds["label"])]
    bad = np.array(ds["reward"])[~np.array(ds["label"])]
    assert 0 < len(good) < 40 and good.mean() > bad.mean()
