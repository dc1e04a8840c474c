"""RLOO and REINFORCE++-baseline vs float64 NumPy: KL-shaped returns, baselines, loss values and
gradients (sequence- and token-level), TIS, limiting cases, the rollout batch builders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.losses.rloo import reinforce_pp_batch, rloo_batch
from prefjax.pipeline.rollouts import Settings
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np
from tests.losses import reference_np_pg as np_pg
from tests.losses.test_grpo import K, rollout

RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_kl_shaped_returns_match_numpy(level):
    d = rollout(10, empty_row=True)
    got = losses.kl_shaped_returns(jnp.asarray(d["rewards"]), d["old"], d["ref"], d["mask"],
                                   kl_coef=0.1, level=level)
    want = np_pg.shaped_returns(d["rewards"], d["old"], d["ref"], d["mask"], 0.1, level)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_advantages_match_numpy(level, k):
    d = rollout(11, k=k)
    ret = np_pg.shaped_returns(d["rewards"], d["old"], d["ref"], d["mask"], 0.05, level)
    r32 = jnp.asarray(ret, jnp.float32)
    for normalize in (False, True):
        got = losses.rloo_advantages(r32, d["mask"], k, normalize=normalize)
        want = (np_pg.rloo_advantages(ret, d["mask"], k, normalize) if k > 1
                else np.zeros_like(ret))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got = losses.reinforce_pp_advantages(r32, d["mask"], k)
    np.testing.assert_allclose(got, np_pg.reinforce_pp_advantages(ret, d["mask"], k),
                               rtol=1e-4, atol=1e-5)


def test_leave_one_out_closed_form():
    """A_i = k / (k - 1) (R_i - mean of the group)."""
    r = jnp.asarray([1.0, 0.0, 3.0, 2.0, 5.0, -1.0])  # k = 3, B = 2 (sample-major)
    adv = losses.rloo_advantages(r, jnp.ones((6, 1)), 3)
    g = np.asarray(r).reshape(3, 2)
    np.testing.assert_allclose(adv, (1.5 * (g - g.mean(0))).ravel(), rtol=1e-6)


def call(d, logps=None, adv=None, **hp):
    lp = jnp.asarray(d["logps"] if logps is None else logps)
    m = jnp.asarray(d["mask"])
    out = PolicyOut(lp, jnp.sum(lp * m, -1), m.sum(-1))
    batch = {"loss_mask": m, "old_token_logps": jnp.asarray(d["old"]),
             "advantages": jnp.asarray(d["adv"] if adv is None else adv),
             "sample_token_logps": jnp.asarray(d["sample"])}
    return losses.get("rloo", **hp)(out, batch)


def token_adv(d):
    return np.asarray(np_pg.rloo_advantages(
        np_pg.shaped_returns(d["rewards"], d["old"], d["ref"], d["mask"], 0.1, "token"),
        d["mask"], K), np.float32)


CASES = [dict(), dict(epsilon=0.1, epsilon_high=0.3), dict(tis_cap=1.1), dict(tis_cap=3.0)]


@pytest.mark.parametrize("hp", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or
                                           "defaults" for c in CASES])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_loss_and_gradient_match_numpy(hp, level):
    d = rollout(12)
    d["old"] = (d["logps"] + 0.05 * (d["old"] - d["logps"])) * d["mask"]  # ratios near the clip
    adv = d["adv"] if level == "sequence" else token_adv(d)
    kw = dict(eps=hp.get("epsilon", 0.2), eps_high=hp.get("epsilon_high"),
              tis_cap=hp.get("tis_cap"), sample=d["sample"])
    loss, metrics = call(d, adv=adv, **hp)
    want = np_pg.rloo(d["logps"], d["old"], adv, d["mask"], **kw)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    assert np.isfinite(float(metrics["clip_ratio/region_mean"]))
    with jax.enable_x64(True):
        g = jax.grad(lambda lp: call(d, logps=lp, adv=adv, **hp)[0])(
            jnp.asarray(d["logps"], jnp.float64))
    fd = ref_np.central_diff(
        lambda x: np_pg.rloo(x.reshape(d["mask"].shape), d["old"], adv, d["mask"], **kw),
        d["logps"].astype(np.float64).ravel()).reshape(d["mask"].shape)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_sequence_clip_is_exercised():
    d = rollout(13)
    _, m = call(d)
    assert 0 < float(m["clip_ratio/region_mean"]) < 1


def test_ratio_one_is_reinforce():
    """pi = pi_old: d L / d log pi_t = -A_row / rows (sequence advantages)."""
    d = rollout(14)
    d["old"] = d["logps"]
    g = jax.grad(lambda lp: call(d, logps=lp)[0])(jnp.asarray(d["logps"]))
    want = -d["adv"][:, None] * d["mask"] / len(d["mask"])
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_batch_builders(level):
    d = rollout(15)
    m = jnp.asarray(d["mask"])
    rows = {"input_ids": jnp.zeros(m.shape, jnp.int32), "attention_mask": m, "loss_mask": m}
    out = PolicyOut(jnp.asarray(d["old"]), jnp.zeros(len(m)), m.sum(-1))
    ref = PolicyOut(jnp.asarray(d["ref"]), jnp.zeros(len(m)), m.sum(-1))
    o = Settings(num_generations=K, kl_coef=0.1, kl_level=level, normalize_advantages=False)
    ret = np_pg.shaped_returns(d["rewards"], d["old"], d["ref"], d["mask"], 0.1, level)
    b = rloo_batch(rows, out, ref, jnp.asarray(d["rewards"]), o)
    np.testing.assert_allclose(b["advantages"], np_pg.rloo_advantages(ret, d["mask"], K),
                               rtol=1e-4, atol=1e-5)
    b = reinforce_pp_batch(rows, out, ref, jnp.asarray(d["rewards"]), o)
    np.testing.assert_allclose(b["advantages"], np_pg.reinforce_pp_advantages(ret, d["mask"], K),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(b["old_token_logps"], d["old"])


def test_bad_hyperparameters_and_missing_keys_fail_clearly():
    with pytest.raises(ValueError, match="tis_cap"):
        losses.get("rloo", tis_cap=0.9)
    with pytest.raises(ValueError, match="epsilon"):
        losses.get("rloo", epsilon=0.0)
    d = rollout(16)
    lp = jnp.asarray(d["logps"])
    out = PolicyOut(lp, lp.sum(-1), jnp.ones(len(lp)))
    with pytest.raises(ValueError, match="advantages"):
        losses.get("rloo")(out, {"loss_mask": jnp.asarray(d["mask"]),
                                 "old_token_logps": jnp.asarray(d["old"]),
                                 "advantages": jnp.zeros(3)})
