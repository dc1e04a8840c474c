"""Online rollout details of issue 16: per-epoch shuffled minibatches, online settings checked at
start, one KL coefficient name, and (slow) a PPO run whose loss scores at the sampling
temperature and whose adaptive KL coefficient follows the controller and survives a resume."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.losses import records
from prefjax.parallel import make_mesh
from prefjax.pipeline import rollouts
from tests.train.test_offline import ROOT, load_config


def fake_state(seed=0, step=3):
    key = jax.random.key_data(jax.random.key(seed))
    return types.SimpleNamespace(rng=key, step=jnp.int32(step))


def recorded_update(epochs, minibatches, paired, rows=12, shuffle=True):
    """Run `make_update` with a step that records the `row` ids of every minibatch."""
    seen = []

    def step(state, mb):
        seen.append(np.asarray(mb["row"]))
        return state, {"loss": jnp.float32(0), "nonfinite": jnp.int32(0)}

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    update = rollouts.make_update(step, epochs=epochs, minibatches=minibatches, paired=paired,
                                  mesh=mesh, shuffle=shuffle)
    batch = {"row": jnp.arange(rows, dtype=jnp.int32),
             "x": jnp.arange(rows * 3, dtype=jnp.float32).reshape(rows, 3)}
    update(fake_state(), {"batch": batch, "metrics": {}})
    return seen


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("minibatches", [1, 2, 3])
def test_shuffled_minibatches_cover_every_row_once_per_epoch(paired, minibatches):
    epochs, rows = 4, 12
    seen = recorded_update(epochs, minibatches, paired, rows)
    assert len(seen) == epochs * minibatches
    orders = []
    for e in range(epochs):
        parts = seen[e * minibatches:(e + 1) * minibatches]
        assert all(len(p) == rows // minibatches for p in parts)
        order = np.concatenate(parts)
        np.testing.assert_array_equal(np.sort(order), np.arange(rows))  # each row exactly once
        orders.append(order)
        if paired:  # each minibatch is itself a pairwise batch: partners at the same offset
            for p in parts:
                half = len(p) // 2
                np.testing.assert_array_equal(p[half:], p[:half] + rows // 2)
    # a fresh permutation every epoch (4 epochs of 12 rows: a repeat is vanishingly unlikely)
    assert len({tuple(o) for o in orders}) == epochs
    assert any(not np.array_equal(o, np.arange(rows)) for o in orders)
    # deterministic given the state: a resumed run shuffles exactly as the original
    again = recorded_update(epochs, minibatches, paired, rows)
    for a, b in zip(seen, again):
        np.testing.assert_array_equal(a, b)


def test_unshuffled_minibatches_are_the_same_slices_every_epoch():
    seen = recorded_update(2, 3, False, shuffle=False)
    np.testing.assert_array_equal(np.concatenate(seen[:3]), np.arange(12))
    for a, b in zip(seen[:3], seen[3:]):
        np.testing.assert_array_equal(a, b)


def test_row_permutation_keeps_the_other_leaves_aligned():
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    batch = {"row": jnp.arange(8, dtype=jnp.int32),
             "x": 10.0 * jnp.arange(8, dtype=jnp.float32)[:, None] * jnp.ones((8, 2))}
    (mb,) = rollouts._minibatches(batch, 1, False, mesh, jax.random.key(1))
    np.testing.assert_array_equal(mb["x"][:, 0], 10.0 * np.asarray(mb["row"]))


def online_config(name, **online):
    c = load_config(ROOT / "configs" / f"{name}.py", "smoke")
    for k, v in online.items():
        c.online[k] = v
    return c


@pytest.mark.parametrize("name,online,match", [
    ("p3o_synthetic", {"kl_target": 1.0}, "kl_target"),
    ("online_dpo_synthetic", {"kl_target": 1.0}, "kl_target"),
    ("ppo_synthetic", {"kl_estimator": "k4"}, "kl_estimator"),
    ("ppo_synthetic", {"temperature": 0.0}, "temperature"),
    ("ppo_synthetic", {"kl_horizon": 0.0}, "kl_horizon"),
    ("ppo_synthetic", {"value_model": "reward"}, "value_model='reward'"),
    ("ppo_synthetic", {"value_model": "big"}, "value_model"),
    ("p3o_synthetic", {"value_model": "reward"}, "value_model"),
    ("grpo_synthetic", {"top_k": -1}, "online.top_k"),
    ("grpo_synthetic", {"top_p": 0.0}, "online.top_p"),
    ("ppo_synthetic", {"top_p": 1.5}, "online.top_p"),
    ("grpo_synthetic", {"cache_rows": -2}, "online.cache_rows"),
    ("rloo_synthetic", {"prefill_buckets": 0}, "online.prefill_buckets"),
])
def test_online_settings_an_algorithm_cannot_use_fail_at_start(name, online, match):
    c = online_config(name, **online)
    with pytest.raises(ValueError, match=match):
        rollouts.check_online(c, records.get(c.algo))


def test_scoring_temperature():
    c = online_config("ppo_synthetic", temperature=0.7)
    assert rollouts.scoring_temperature(c) == 0.7
    c.online.logps_at_temperature = False
    assert rollouts.scoring_temperature(c) == 1.0


def test_p3o_kl_coef_has_one_name():
    """loss.kl_coef (P3O's old knob) and online.kl_coef are one value: setting either sets it,
    so neither is silently ignored."""
    from prefjax import losses

    c = load_config(ROOT / "configs" / "p3o_synthetic.py", "smoke,kl=0.2")
    assert c.online.kl_coef == 0.2 and c.loss.kl_coef == 0.2
    c.loss.kl_coef = 0.3
    assert c.online.kl_coef == 0.3
    c.online.kl_coef = 0.4
    hp = c.loss.to_dict()
    assert hp["kl_coef"] == 0.4
    assert losses.get("p3o", **hp).keywords["kl_coef"] == 0.4
    # PPO has no loss.kl_coef: the locked config refuses the wrong name, naming it
    ppo = load_config(ROOT / "configs" / "ppo_synthetic.py", "smoke")
    with pytest.raises(AttributeError, match="kl_coef"):
        ppo.loss.kl_coef = 0.1


@pytest.mark.slow
def test_ppo_scores_at_temperature_and_adapts_its_kl_coef_across_a_resume(tmp_path):
    """PPO at T = 0.7, one epoch: the loss's first (only) update sees ratio 1 (policy and old
    log-probs at the same T), the sampler's log-probs equal the scorer's, and objective/kl_coef
    follows beta_{s+1} = beta_s (1 + clip(KL_s / target - 1, +-0.2) n / H), also across a
    resume (the coefficient is checkpointed)."""
    from prefjax.main import run
    from prefjax.metrics import read_metrics

    c = online_config("ppo_synthetic", temperature=0.7, kl_target=0.02, kl_horizon=40.0,
                      epochs=1, kl_estimator="k3")
    c.train.num_steps, c.train.log_every, c.train.save_every = 3, 1, 1
    c.train.eval_every, c.train.export_hf = 100, False
    run(c, str(tmp_path))
    c.train.num_steps = 5  # a schedule field: the same workdir resumes at step 3
    run(c, str(tmp_path))
    recs = {r["step"]: r for r in read_metrics(tmp_path) if "objective/kl_coef" in r}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    n = c.train.batch_size
    beta = 0.05
    for s in range(1, 6):
        r = recs[s]
        np.testing.assert_allclose(r["objective/kl_coef"], beta, rtol=1e-5, err_msg=str(s))
        e = np.clip(r["objective/kl"] / 0.02 - 1, -0.2, 0.2)
        beta = beta * (1 + e * n / 40.0)
        assert abs(r["val/ratio"] - 1) < 1e-5 and r["policy/approxkl_avg"] < 1e-9
        assert r["rollout/logp_mismatch_max"] < 1e-3
        assert 0 < r["rollout/entropy_token_avg"] < np.log(c.model.vocab_size or 1e9)
    assert recs[5]["objective/kl_coef"] != pytest.approx(0.05, rel=1e-3)
