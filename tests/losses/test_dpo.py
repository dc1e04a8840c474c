"""DPO family vs float64 NumPy, gradients, and the limiting / minimiser properties (sec. 1-2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from prefjax import losses
from prefjax.losses.dpo import LOSS_TYPES, SMOOTHED
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np

RTOL, ATOL = 1e-5, 1e-6


def pair_data(seed, n=6, dtype=np.float32):
    """Random policy / reference sequence log-probs [2n] and lengths [2n], exact in dtype."""
    r = np.random.default_rng(seed)
    lengths = r.integers(3, 20, 2 * n).astype(dtype)
    pi = (-r.uniform(0.5, 3.0, 2 * n) * lengths).astype(dtype)
    ref = (pi + r.normal(0, 2.0, 2 * n)).astype(dtype)
    return pi, ref, lengths


def out_of(pi, lengths):
    b = pi.shape[0]
    return PolicyOut(token_logps=jnp.zeros((b, 1), pi.dtype), logps=jnp.asarray(pi),
                     lengths=jnp.asarray(lengths))


def eps_for(loss_type):
    return {"exo_pair": 1e-3, "robust": 0.2, "sigmoid": 0.1, "aot": 0.1}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_types_match_numpy(loss_type, beta):
    pi, ref, ln = pair_data(LOSS_TYPES.index(loss_type))
    eps = eps_for(loss_type)
    fn = losses.get("dpo", beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss, metrics = fn(out_of(pi, ln), {"ref_logps": jnp.asarray(ref)})
    assert loss.dtype == jnp.float32 and loss.shape == ()
    want = ref_np.dpo(pi, ref, ln, beta=beta, loss_type=loss_type, eps=eps)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    for k, val in ref_np.dpo_metrics(pi, ref, beta).items():
        np.testing.assert_allclose(metrics[k], val, rtol=RTOL, atol=ATOL, err_msg=k)


def test_ipo_sum_form_cdpo_and_reference_free_match_numpy():
    pi, ref, ln = pair_data(3)
    out, batch = out_of(pi, ln), {"ref_logps": jnp.asarray(ref)}
    got = losses.get("ipo", beta=0.3, average=False)(out, batch)[0]
    np.testing.assert_allclose(got, ref_np.dpo(pi, ref, ln, beta=0.3, loss_type="ipo",
                                               ipo_average=False), rtol=RTOL)
    got = losses.get("ipo", beta=0.3)(out, batch)[0]
    np.testing.assert_allclose(got, ref_np.dpo(pi, ref, ln, beta=0.3, loss_type="ipo"), rtol=RTOL)
    got = losses.get("cdpo", beta=0.3, label_smoothing=0.2)(out, batch)[0]
    np.testing.assert_allclose(got, ref_np.dpo(pi, ref, ln, beta=0.3, eps=0.2), rtol=RTOL)
    # reference_free: ref_logps may be absent and count as 0
    got = losses.get("dpo", beta=0.05, reference_free=True)(out, {})[0]
    np.testing.assert_allclose(got, ref_np.dpo(pi, 0 * ref, ln, beta=0.05), rtol=RTOL)


def test_weighted_loss_list_and_rpo_match_numpy():
    pi, ref, ln = pair_data(4)
    fn = losses.get("dpo", beta=0.2, loss_type=["sigmoid", "bco_pair", "sft"],
                    loss_weights=[0.8, 0.2, 1.0], rpo_alpha=0.5)
    loss, metrics = fn(out_of(pi, ln), {"ref_logps": jnp.asarray(ref)})
    parts = {t: ref_np.dpo(pi, ref, ln, beta=0.2, loss_type=t) for t in ("sigmoid", "bco_pair",
                                                                          "sft")}
    nll = -pi[:6].astype(np.float64).sum() / ln[:6].sum()
    want = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + parts["sft"] + 0.5 * nll
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(metrics["loss/bco_pair"], parts["bco_pair"], rtol=RTOL)
    np.testing.assert_allclose(metrics["nll_loss"], nll, rtol=RTOL)


@pytest.mark.parametrize("name,kw", [
    ("simpo", dict(beta=2.0, gamma=0.8, label_smoothing=0.1, alpha=0.3)),
    ("cpo", dict(beta=0.2, alpha=1.0, label_smoothing=0.05)),
    ("orpo", dict(beta=0.25)),
])
def test_reference_free_losses_match_numpy(name, kw):
    pi, _, ln = pair_data(5)
    loss, metrics = losses.get(name, **kw)(out_of(pi, ln), {})
    if name == "simpo":
        want = ref_np.simpo(pi, ln, beta=2.0, gamma=0.8, eps=0.1, alpha=0.3)
    elif name == "cpo":
        want = ref_np.cpo(pi, ln, beta=0.2, alpha=1.0, eps=0.05)
    else:
        want = ref_np.orpo(pi, ln, beta=0.25)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(metrics["logps/chosen"], pi[:6].astype(np.float64).mean(),
                               rtol=RTOL)


def _grad_check(fn, pi, ln, batch):
    """jax.grad wrt the sequence log-probs vs central differences, all float64."""
    with jax.enable_x64(True):
        ln64 = jnp.asarray(ln, jnp.float64)

        def f(x):
            return fn(out_of(jnp.asarray(x, jnp.float64), ln64), batch)[0]

        x0 = np.asarray(pi, np.float64)
        g = np.asarray(jax.grad(f)(x0))
        fd = ref_np.central_diff(jax.jit(f), x0)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    assert np.abs(g).max() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_gradients_finite_differences(loss_type):
    pi, ref, ln = pair_data(11, n=4)
    fn = losses.get("dpo", beta=0.4, loss_type=loss_type, label_smoothing=eps_for(loss_type),
                    rpo_alpha=0.3)
    with jax.enable_x64(True):
        batch = {"ref_logps": jnp.asarray(ref, jnp.float64)}
    _grad_check(fn, pi, ln, batch)


@pytest.mark.parametrize("name,kw", [("simpo", {}), ("cpo", {}), ("orpo", {}),
                                     ("ipo", {"average": False}), ("cdpo", {})])
def test_other_gradients_finite_differences(name, kw):
    pi, ref, ln = pair_data(12, n=4)
    with jax.enable_x64(True):
        batch = {"ref_logps": jnp.asarray(ref, jnp.float64)}
    _grad_check(losses.get(name, **kw), pi, ln, batch)


def test_dpo_gradient_closed_form():
    """dL/dlog pi(y_w) = -beta sigma(-beta h) / n and the opposite on y_l (section 1)."""
    pi, ref, ln = pair_data(13)
    beta, n = 0.3, 6
    g = jax.grad(lambda x: losses.get("dpo", beta=beta)(out_of(x, ln),
                                                        {"ref_logps": jnp.asarray(ref)})[0])(
        jnp.asarray(pi))
    p64, r64 = pi.astype(np.float64), ref.astype(np.float64)
    h = (p64[:n] - r64[:n]) - (p64[n:] - r64[n:])
    w = -beta * ref_np.sig(-beta * h) / n
    np.testing.assert_allclose(g, np.concatenate([w, -w]), rtol=1e-5, atol=1e-7)


def _single_pair(h, **kw):
    """Loss of one pair with log-ratio margin h (ref 0, both lengths 1), as a float."""
    name = kw.pop("name", "dpo")
    pi = jnp.asarray([h, 0.0], jnp.float64)
    out = PolicyOut(jnp.zeros((2, 1)), pi, jnp.asarray(kw.pop("lengths", [1.0, 1.0])))
    return float(losses.get(name, **kw)(out, {"ref_logps": jnp.zeros(2, jnp.float64)})[0])


def test_dpo_depends_on_beta_h_only_and_small_beta_limit():
    """loss(beta, h) = -log sigma(z) with z = beta h: (beta, h) and (beta/4, 4h) agree, and for
    beta -> 0 loss = log 2 - z/2 + z^2/8 + O(z^4) (first-order expansion plus its remainder)."""
    pi, ref, ln = pair_data(14)
    n = 6
    with jax.enable_x64(True):
        p64, r64 = jnp.asarray(pi, jnp.float64), jnp.asarray(ref, jnp.float64)
        h = np.asarray((p64[:n] - r64[:n]) - (p64[n:] - r64[n:]))
        for beta in (0.5, 1e-2, 1e-3):
            a = losses.get("dpo", beta=beta)(out_of(p64, ln), {"ref_logps": r64})[0]
            scaled = jnp.concatenate([4 * (p64[:n] - r64[:n]), 4 * (p64[n:] - r64[n:])])
            b = losses.get("dpo", beta=beta / 4)(out_of(scaled, ln), {"ref_logps": 0 * r64})[0]
            np.testing.assert_allclose(a, b, rtol=1e-12)
            z = beta * h
            first = math.log(2) - z.mean() / 2
            assert abs(float(a) - first - (z**2).mean() / 8) <= (z**4).mean() / 96 + 1e-15
            if beta < 0.1:  # the loss/beta slope tends to -mean(h)/2
                slope = (float(a) - math.log(2)) / beta
                assert abs(slope + h.mean() / 2) <= beta * (h**2).mean() / 4


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_minimiser_is_half_over_tau(tau):
    with jax.enable_x64(True):
        res = minimize_scalar(lambda h: _single_pair(h, name="ipo", beta=tau, average=False),
                              bracket=(-1.0, 1.0), tol=1e-12)
        np.testing.assert_allclose(res.x, 1 / (2 * tau), rtol=1e-6)
        # averaged form (TRL): lengths 4 and 4 put the summed margin at 4 / (2 tau)
        res = minimize_scalar(lambda h: _single_pair(h, name="ipo", beta=tau, lengths=[4., 4.]),
                              bracket=(-1.0, 1.0), tol=1e-12)
        np.testing.assert_allclose(res.x, 4 / (2 * tau), rtol=1e-6)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (0.5, 0.3), (2.0, 0.01)])
def test_cdpo_finite_minimiser(beta, eps):
    want = math.log((1 - eps) / eps) / beta
    with jax.enable_x64(True):
        res = minimize_scalar(lambda h: _single_pair(h, name="cdpo", beta=beta,
                                                     label_smoothing=eps),
                              bracket=(0.0, want / 2), tol=1e-12)
    np.testing.assert_allclose(res.x, want, rtol=1e-5)


def test_smoothed_types_listed_are_the_ones_reading_eps():
    """label_smoothing changes exactly the SMOOTHED loss types (so the get() check is honest)."""
    pi, ref, ln = pair_data(15)
    out, batch = out_of(pi, ln), {"ref_logps": jnp.asarray(ref)}
    from prefjax.losses.dpo import dpo_loss_from_logps
    n = 6
    args = (out.logps[:n], out.logps[n:], batch["ref_logps"][:n], batch["ref_logps"][n:],
            out.lengths[:n], out.lengths[n:])
    for t in LOSS_TYPES:
        a = dpo_loss_from_logps(*args, beta=0.3, loss_type=t, label_smoothing=0.01)
        b = dpo_loss_from_logps(*args, beta=0.3, loss_type=t, label_smoothing=0.2)
        assert (not np.isclose(a, b)) == (t in SMOOTHED), t
