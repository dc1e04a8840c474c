"""MPO vs float64 NumPy for every option, gradients, zero-KL reduction, padded reference rows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np

RTOL, ATOL = 1e-5, 1e-6


def mpo_data(seed, n=5, m=4, pad=1):
    """Pairs (2n rows) + m reference-sample rows, the last `pad` of them padding (flag 0)."""
    r = np.random.default_rng(seed)
    b = 2 * n + m
    lengths = r.integers(2, 15, b).astype(np.float32)
    logps = (-r.uniform(0.3, 2.0, b) * lengths).astype(np.float32)
    ref = (logps + r.normal(0, 1.5, b)).astype(np.float32)
    flags = np.ones(m, np.float32)
    if pad:
        flags[m - pad:] = 0
        logps[b - pad:] = np.nan  # garbage the loss must never read
        lengths[b - pad:] = 0
    return logps, lengths, ref, flags


def mpo_call(logps, lengths, ref, flags, **kw):
    out = PolicyOut(jnp.zeros((len(logps), 1), logps.dtype), jnp.asarray(logps),
                    jnp.asarray(lengths))
    batch = {"ref_sample_mask": jnp.asarray(flags)}
    if ref is not None:
        batch["ref_logps"] = jnp.asarray(ref)
    return losses.get("mpo", **kw)(out, batch)


OPTIONS = list(itertools.product(["policy_ref", "ref_policy"], [False, True], [True, False]))


@pytest.mark.parametrize("direction,uniform,average", OPTIONS)
def test_mpo_matches_numpy(direction, uniform, average):
    logps, lengths, ref, flags = mpo_data(OPTIONS.index((direction, uniform, average)))
    n, kw = 5, dict(beta=0.3, alpha=0.7)
    loss, metrics = mpo_call(logps, lengths, None if uniform else ref, flags,
                             pair_kl_direction=direction, p_ref_uniform=uniform,
                             ref_nll_average=average, **kw)
    want, terms = ref_np.mpo(logps[:2 * n], ref[:2 * n], logps[2 * n:], lengths[2 * n:], flags,
                             direction=direction, uniform=uniform, average=average, **kw)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    for k, val in terms.items():
        np.testing.assert_allclose(metrics[k], val, rtol=RTOL, atol=ATOL, err_msg=k)
    np.testing.assert_allclose(metrics["logps/chosen"], logps[:n].astype(np.float64).mean(),
                               rtol=RTOL)


@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
def test_mpo_gradient_finite_differences(direction):
    logps, lengths, ref, flags = mpo_data(20, pad=0)
    fn = losses.get("mpo", beta=0.5, alpha=0.4, pair_kl_direction=direction,
                    ref_nll_average=direction == "policy_ref")
    with jax.enable_x64(True):
        batch = {"ref_logps": jnp.asarray(ref, jnp.float64), "ref_sample_mask": jnp.asarray(flags)}
        ln = jnp.asarray(lengths, jnp.float64)

        def f(x):
            return fn(PolicyOut(jnp.zeros((len(x), 1)), jnp.asarray(x), ln), batch)[0]

        x0 = logps.astype(np.float64)
        g = np.asarray(jax.grad(f)(x0))
        fd = ref_np.central_diff(jax.jit(f), x0)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_mpo_zero_kl_weights_is_the_preference_term():
    """alpha = beta = 0: L = -mean sigma(Delta), gradient -sigma'(Delta)(grad l_w - grad l_l)/n,
    and reference samples get no gradient."""
    logps, lengths, ref, flags = mpo_data(21, pad=0)
    n = 5

    def f(x):
        return mpo_call(x, lengths, ref, flags, beta=0.0, alpha=0.0)

    loss, metrics = f(logps)
    d = logps[:n].astype(np.float64) - logps[n:2 * n]
    np.testing.assert_allclose(loss, -ref_np.sig(d).mean(), rtol=RTOL)
    np.testing.assert_allclose(metrics["loss/pref"], loss, rtol=1e-7)
    g = np.asarray(jax.grad(lambda x: f(x)[0])(jnp.asarray(logps)))
    s = ref_np.sig(d) * (1 - ref_np.sig(d))
    want = np.concatenate([-s / n, s / n, np.zeros(4)])
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)


def test_mpo_padded_reference_rows_change_nothing():
    logps, lengths, ref, flags = mpo_data(22, m=4, pad=0)
    b = len(logps)
    pad_lp = np.concatenate([logps, [np.inf, -1e30]]).astype(np.float32)
    pad_len = np.concatenate([lengths, [0, 7]]).astype(np.float32)
    pad_ref = np.concatenate([ref, [np.nan, 3.0]]).astype(np.float32)
    pad_flags = np.concatenate([flags, [0, 0]]).astype(np.float32)
    for average in (True, False):
        kw = dict(beta=0.2, alpha=1.0, ref_nll_average=average)

        def f(x, ln, r, fl, kw=kw):
            return mpo_call(x, ln, r, fl, **kw)[0]

        a = f(logps, lengths, ref, flags)
        c = f(pad_lp, pad_len, pad_ref, pad_flags)
        np.testing.assert_allclose(a, c, rtol=1e-6)
        ga = jax.grad(f)(jnp.asarray(logps), lengths, ref, flags)
        gc = jax.grad(f)(jnp.asarray(pad_lp), pad_len, pad_ref, pad_flags)
        np.testing.assert_allclose(gc[:b], ga, rtol=1e-6)
        assert np.all(gc[b:] == 0)


def test_mpo_without_reference():
    logps, lengths, ref, flags = mpo_data(23)
    with pytest.raises(ValueError, match="ref_logps"):
        mpo_call(logps, lengths, None, flags, beta=0.1)
    # p_ref_uniform or beta = 0 need no reference log-probs at all
    assert np.isfinite(mpo_call(logps, lengths, None, flags, beta=0.1, p_ref_uniform=True)[0])
    assert np.isfinite(mpo_call(logps, lengths, None, flags, beta=0.0)[0])
    # no reference samples: fine with alpha = 0, a clear error otherwise
    out = PolicyOut(jnp.zeros((10, 1)), jnp.asarray(logps[:10]), jnp.asarray(lengths[:10]))
    assert np.isfinite(losses.get("mpo", alpha=0.0, beta=0.0)(out, {})[0])
    with pytest.raises(ValueError, match="ref_sample_mask"):
        losses.get("mpo", alpha=0.5, beta=0.0)(out, {})


def _bandit_policy(alpha, steps=3000):
    """IPO's 3-action bandit, D1 = {(a,b), (b,c), (a,c)}, pi = softmax(theta), theta_0 = 0, full
    batch Adam(0.01); reference samples: each action once (pi_ref uniform)."""
    import optax

    chosen, rejected, samples = jnp.array([0, 1, 0]), jnp.array([1, 2, 2]), jnp.arange(3)
    idx = jnp.concatenate([chosen, rejected, samples])
    fn = losses.get("mpo", beta=0.1, alpha=alpha, p_ref_uniform=True)
    batch = {"ref_sample_mask": jnp.ones(3)}

    def loss(theta):
        lp = jax.nn.log_softmax(theta)[idx]
        return fn(PolicyOut(lp[:, None], lp, jnp.ones(9)), batch)[0]

    opt = optax.adam(0.01)

    def step(carry, _):
        theta, state = carry
        upd, state = opt.update(jax.grad(loss)(theta), state)
        return (optax.apply_updates(theta, upd), state), None

    theta = jnp.zeros(3)
    (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)
    return np.asarray(jax.nn.softmax(theta))


def test_mpo_reference_nll_keeps_the_bandit_policy_off_greedy():
    """Section 3 test: alpha > 0 keeps pi away from greedy; alpha -> 0 approaches greedy."""
    greedy = _bandit_policy(0.0)
    regular = _bandit_policy(1.0)
    assert greedy[0] > 0.95 and greedy[2] < 0.01
    assert regular[0] < 0.8 and regular[2] > 0.1
    assert regular[0] > regular[1] > regular[2]  # the preference order is still learned
