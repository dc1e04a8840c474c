"""PPO helpers and loss vs float64 NumPy loops, gradients, the ratio-1 policy gradient, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np

RTOL, ATOL = 1e-5, 1e-6


def rollout(seed, b=4, t=9):
    """Rows of prompt (mask 0), response (mask 1) and right padding (mask 0); one empty row."""
    r = np.random.default_rng(seed)
    mask = np.zeros((b, t), np.float32)
    for i in range(b - 1):
        start = r.integers(1, 4)
        mask[i, start:start + r.integers(1, t - start + 1)] = 1
    f = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    logps = (-np.abs(f(b, t)) - 0.5) * mask
    return dict(mask=mask, logps=logps, ref=(logps + 0.3 * f(b, t)) * mask,
                old=(logps + 0.2 * f(b, t)) * mask, values=f(b, t) * mask,
                old_values=f(b, t) * mask, adv=f(b, t) * mask, ret=f(b, t) * mask,
                scores=f(b))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_shaped_rewards_match_numpy(estimator):
    d = rollout(0)
    got = losses.kl_shaped_rewards(d["scores"], d["logps"], d["ref"], d["mask"], kl_coef=0.05,
                                   estimator=estimator)
    want = ref_np.shaped_rewards(d["scores"], d["logps"], d["ref"], d["mask"], kl_coef=0.05,
                                 estimator=estimator)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_numpy(gamma, lam):
    d = rollout(1)
    rew = ref_np.shaped_rewards(d["scores"], d["logps"], d["ref"], d["mask"], kl_coef=0.1)
    adv, ret = losses.gae(jnp.asarray(rew, jnp.float32), d["values"], d["mask"], gamma=gamma,
                          lam=lam)
    want_a, want_r = ref_np.gae(rew, d["values"], d["mask"], gamma=gamma, lam=lam)
    np.testing.assert_allclose(adv, want_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, want_r, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    d = rollout(2)
    x = d["adv"] * 3 + 1.5
    got = losses.whiten(x, d["mask"], shift_mean=shift_mean)
    np.testing.assert_allclose(got, ref_np.whiten(x, d["mask"], shift_mean), rtol=RTOL,
                               atol=ATOL)


def ppo_call(d, **kw):
    out = PolicyOut(jnp.asarray(d["logps"]), jnp.asarray(d["logps"]).sum(-1),
                    jnp.asarray(d["mask"]).sum(-1), values=jnp.asarray(d["values"]))
    batch = {"old_token_logps": d["old"], "advantages": d["adv"], "returns": d["ret"],
             "old_values": d["old_values"], "loss_mask": d["mask"]}
    return losses.get("ppo", **kw)(out, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_ppo_loss_and_metrics_match_numpy(eps):
    d = rollout(3)
    loss, metrics = ppo_call(d, clip_eps=eps, clip_eps_value=0.3, vf_coef=0.1)
    want, want_m = ref_np.ppo(d["logps"], d["old"], d["values"], d["old_values"], d["adv"],
                              d["ret"], d["mask"], eps=eps, eps_v=0.3, vf_coef=0.1)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    for k, val in want_m.items():
        np.testing.assert_allclose(metrics[k], val, rtol=RTOL, atol=ATOL, err_msg=k)
    assert 0 < float(metrics["policy/clipfrac_avg"]) < 1  # both branches exercised


def test_ppo_gradient_finite_differences():
    d = rollout(4)
    with jax.enable_x64(True):
        d64 = {k: jnp.asarray(v, jnp.float64) for k, v in d.items()}
        bt = d["mask"].shape
        fn = losses.get("ppo", clip_eps=0.1, vf_coef=0.5)
        batch = {"old_token_logps": d64["old"], "advantages": d64["adv"], "returns": d64["ret"],
                 "old_values": d64["old_values"], "loss_mask": d64["mask"]}

        def f(x):
            lp, val = x[:x.size // 2].reshape(bt), x[x.size // 2:].reshape(bt)
            return fn(PolicyOut(lp, lp.sum(-1), d64["mask"].sum(-1), values=val), batch)[0]

        x0 = np.concatenate([d["logps"].ravel(), d["values"].ravel()]).astype(np.float64)
        g = np.asarray(jax.grad(f)(jnp.asarray(x0)))
        fd = ref_np.central_diff(jax.jit(f), x0)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_ppo_is_vanilla_policy_gradient_at_ratio_one():
    """pi = pi_old: d L_pi / d log pi_t = -A_t / (number of response tokens)."""
    d = rollout(5)
    d["old"] = d["logps"]

    def f(lp):
        return ppo_call({**d, "logps": lp}, vf_coef=0.0)[0]

    g = jax.grad(f)(jnp.asarray(d["logps"]))
    np.testing.assert_allclose(g, -d["adv"] * d["mask"] / d["mask"].sum(), rtol=1e-6, atol=1e-9)


def test_ppo_padding_changes_nothing():
    d = rollout(6)
    base = ppo_call(d)
    g_base = jax.grad(lambda lp: ppo_call({**d, "logps": lp})[0])(jnp.asarray(d["logps"]))
    pad = {}
    for k, v in d.items():
        if v.ndim == 2:  # three padding columns of garbage under mask 0
            junk = np.full((v.shape[0], 3), 0.0 if k == "mask" else np.nan, np.float32)
            if k in ("logps", "values"):
                junk[:, 0] = np.inf
            pad[k] = np.concatenate([v, junk], axis=1)
        else:
            pad[k] = v
    pad_out = ppo_call(pad)
    np.testing.assert_allclose(pad_out[0], base[0], rtol=1e-6)
    for k in base[1]:
        np.testing.assert_allclose(pad_out[1][k], base[1][k], rtol=1e-6, err_msg=k)
    g_pad = jax.grad(lambda lp: ppo_call({**pad, "logps": lp})[0])(jnp.asarray(pad["logps"]))
    np.testing.assert_allclose(g_pad[:, :9], g_base, rtol=1e-6)
    assert np.all(g_pad[:, 9:] == 0)


def test_ppo_needs_values():
    d = rollout(7)
    out = PolicyOut(jnp.asarray(d["logps"]), jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match="values"):
        losses.get("ppo")(out, {})


def test_rollout_metrics_match_numpy():
    d = rollout(8)
    m = losses.rollout_metrics(d["scores"], d["logps"], d["ref"], d["mask"], kl_coef=0.05)
    kl = ((d["logps"].astype(np.float64) - d["ref"]) * d["mask"]).sum(-1)
    np.testing.assert_allclose(m["objective/kl"], kl.mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["objective/rlhf_reward"],
                               np.mean(d["scores"] - 0.05 * kl), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_rollout_kl_uses_the_estimator(estimator):
    d = rollout(9)
    m = losses.rollout_metrics(d["scores"], d["logps"], d["ref"], d["mask"], kl_coef=0.1,
                               estimator=estimator)
    k1 = (d["logps"].astype(np.float64) - d["ref"])
    k = {"k1": k1, "k2": 0.5 * k1 ** 2, "k3": np.expm1(-k1) + k1}[estimator]
    kl = (k * d["mask"]).sum(-1)
    np.testing.assert_allclose(m["objective/kl"], kl.mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["objective/rlhf_reward"], np.mean(d["scores"] - 0.1 * kl),
                               rtol=RTOL, atol=ATOL)


def test_unknown_kl_estimator_fails():
    with pytest.raises(ValueError, match="k1, k2, k3|'k1', 'k2', 'k3'"):
        losses.kl_penalty(jnp.zeros(2), jnp.zeros(2), estimator="k4")


def test_adaptive_kl_controller_matches_its_closed_form():
    """Ziegler et al. (2019): beta' = beta (1 + clip(KL/target - 1, -0.2, 0.2) n / H); for a
    constant KL, m updates give beta (1 + e n / H)^m."""
    from prefjax.losses.ppo import adaptive_kl_coef

    target, horizon, n = 6.0, 10000.0, 512
    for kl, e in [(7.5, 0.2), (6.6, 0.1), (6.0, 0.0), (5.1, -0.15),
                  (0.3, -0.2), (100.0, 0.2)]:
        beta = 0.2
        with jax.enable_x64(True):
            for _ in range(25):
                beta = adaptive_kl_coef(beta, kl, n, target=target, horizon=horizon)
        np.testing.assert_allclose(beta, 0.2 * (1 + e * n / horizon) ** 25, rtol=1e-12)
    # jnp scalars (the rollout's traced form) agree with the float form
    got = adaptive_kl_coef(jnp.float32(0.05), jnp.float32(3.0), 64, target=2.0, horizon=100.0)
    np.testing.assert_allclose(got, 0.05 * (1 + 0.2 * 64 / 100), rtol=1e-6)
    with pytest.raises(ValueError, match="target > 0"):
        adaptive_kl_coef(0.1, 1.0, 8, target=0.0, horizon=10.0)
