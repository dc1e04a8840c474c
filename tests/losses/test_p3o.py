"""P3O variants vs float64 NumPy, closed-form gradients, the ratio-1 pairwise policy gradient."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np

RTOL, ATOL = 1e-5, 1e-6
VARIANTS = ["v1", "v2", "official"]


def p3o_data(seed, n=8, spread=0.3):
    """y1 rows [:n], y2 rows [n:]; policy drifted from pi_old by ~spread (so some clips bind)."""
    r = np.random.default_rng(seed)
    lengths = r.integers(3, 30, 2 * n).astype(np.float32)
    old = (-r.uniform(0.5, 2.0, 2 * n) * lengths).astype(np.float32)
    pi = (old + r.normal(0, spread, 2 * n)).astype(np.float32)
    ref = (old + r.normal(0, 1.0, 2 * n)).astype(np.float32)
    rewards = r.normal(0, 2.0, 2 * n).astype(np.float32)
    return pi, old, ref, rewards, lengths


def p3o_call(pi, old, ref, rewards, lengths, **kw):
    out = PolicyOut(jnp.zeros((len(pi), 1), pi.dtype), pi, jnp.asarray(lengths))
    batch = {"old_logps": jnp.asarray(old), "ref_logps": jnp.asarray(ref),
             "rewards": jnp.asarray(rewards)}
    return losses.get("p3o", **kw)(out, batch)


CASES = list(itertools.product(VARIANTS, [False, True], [True, False]))


@pytest.mark.parametrize("variant,scale_q,avg_tokenwise", CASES)
def test_p3o_matches_numpy(variant, scale_q, avg_tokenwise):
    pi, old, ref, rw, ln = p3o_data(CASES.index((variant, scale_q, avg_tokenwise)))
    kw = dict(variant=variant, kl_coef=0.1, scale_q=scale_q, avg_tokenwise=avg_tokenwise)
    loss, metrics = p3o_call(jnp.asarray(pi), old, ref, rw, ln, clip_eps=0.2,
                             cliprange_ratio=1.5, **kw)
    want = ref_np.p3o(pi, old, ref, rw, ln, eps=0.2, R=1.5, **kw)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    assert 0 < float(metrics["policy_clipfrac"]) < 1, "test data should exercise both branches"


def test_p3o_metrics_match_numpy():
    pi, old, ref, rw, ln = p3o_data(30)
    n = 8
    _, m = p3o_call(jnp.asarray(pi), old, ref, rw, ln, kl_coef=0.05)
    p, o, r, w = (x.astype(np.float64) for x in (pi, old, ref, rw))
    ell = p - r
    diff = w[:n] - w[n:]
    q = diff - 0.05 * (ell[:n] - ell[n:])
    hi = np.where(diff >= 0, ell[:n], ell[n:])
    lo = np.where(diff >= 0, ell[n:], ell[:n])
    joint = np.exp((p - o)[:n] + (p - o)[n:])
    want = {"reward_diff_mean": diff.mean(), "reward_diff_abs": np.abs(diff).mean(),
            "reward_diff_std": diff.std(), "q_diff_mean": q.mean(),
            "q_diff_abs_mean": np.abs(q).mean(), "q_diff_std": q.std(),
            "logratio_chosen_mean": hi.mean(), "logratio_lose_mean": lo.mean(),
            "logratio_gap_mean": (hi - lo).mean(), "ratio_mean": joint.mean(),
            "ratio_max": joint.max(), "ratio_min": joint.min()}
    for k, val in want.items():
        np.testing.assert_allclose(m[k], val, rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.mark.parametrize("variant,scale_q,avg_tokenwise", CASES)
def test_p3o_gradient_closed_form(variant, scale_q, avg_tokenwise):
    """q and w are detached: the gradient is the clipped, importance-weighted PPG."""
    pi, old, ref, rw, ln = p3o_data(40 + CASES.index((variant, scale_q, avg_tokenwise)))
    kw = dict(variant=variant, kl_coef=0.1, scale_q=scale_q, avg_tokenwise=avg_tokenwise)
    with jax.enable_x64(True):
        g = jax.grad(lambda x: p3o_call(x, old.astype(np.float64), ref.astype(np.float64),
                                        rw.astype(np.float64), ln.astype(np.float64),
                                        clip_eps=0.2, cliprange_ratio=1.5, **kw)[0])(
            jnp.asarray(pi, jnp.float64))
    want = ref_np.p3o_grad(pi, old, ref, rw, ln, eps=0.2, R=1.5, **kw)
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
    assert np.count_nonzero(want) < len(want), "some clip should bind in this data"


@pytest.mark.parametrize("variant", VARIANTS)
def test_p3o_is_pairwise_policy_gradient_at_ratio_one(variant):
    """pi = pi_old: every variant's gradient is -(q/2)(grad log pi(y1) - grad log pi(y2)) / n."""
    _, old, ref, rw, ln = p3o_data(50)
    n = 8
    g = jax.grad(lambda x: p3o_call(x, old, ref, rw, ln, variant=variant, kl_coef=0.1,
                                    avg_tokenwise=False)[0])(jnp.asarray(old))
    ell = old.astype(np.float64) - ref
    q = (rw[:n] - rw[n:]) - 0.1 * (ell[:n] - ell[n:])
    np.testing.assert_allclose(g, np.concatenate([-q / 2, q / 2]) / n, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_p3o_invariant_to_per_prompt_reward_shift(variant):
    pi, old, ref, rw, ln = p3o_data(60)
    shift = np.tile(np.random.default_rng(0).normal(0, 5, 8), 2).astype(np.float32)
    a = p3o_call(jnp.asarray(pi), old, ref, rw, ln, variant=variant)[0]
    b = p3o_call(jnp.asarray(pi), old, ref, rw + shift, ln, variant=variant)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_p3o_missing_key():
    pi, old, ref, rw, ln = p3o_data(61)
    out = PolicyOut(jnp.zeros((16, 1)), jnp.asarray(pi), jnp.asarray(ln))
    with pytest.raises(ValueError, match="old_logps"):
        losses.get("p3o")(out, {"ref_logps": ref, "rewards": rw})


def tokenwise_data(seed, n=4, t=6):
    r = np.random.default_rng(seed)
    mask = (r.uniform(size=(2 * n, t)) < 0.8).astype(np.float32)
    mask[:, 0] = 0
    old_tl = np.where(mask > 0, -r.uniform(0.1, 3, (2 * n, t)), 0).astype(np.float32)
    tl = np.where(mask > 0, old_tl + r.normal(0, 0.2, (2 * n, t)), 0).astype(np.float32)
    pi, old = tl.sum(-1), old_tl.sum(-1)
    ref = (old + r.normal(0, 1, 2 * n)).astype(np.float32)
    return tl, old_tl, mask, pi, old, ref, r.normal(0, 2, 2 * n).astype(np.float32)


def tokenwise_call(tl, old_tl, mask, pi, old, ref, rw, **kw):
    out = PolicyOut(tl, pi, mask.sum(-1))
    batch = {"old_logps": old, "ref_logps": ref, "rewards": rw, "old_token_logps": old_tl,
             "loss_mask": mask}
    return losses.get("p3o", clip_tokenwise=True, kl_coef=0.1, clip_eps=0.15,
                      cliprange_ratio=1.3, **kw)(out, batch)


def test_p3o_clip_tokenwise_matches_numpy_gradient_and_padding():
    tl, old_tl, mask, pi, old, ref, rw = tokenwise_data(70)
    loss, m = tokenwise_call(*(jnp.asarray(x) for x in (tl, old_tl, mask, pi, old, ref, rw)))
    want = ref_np.p3o_tokenwise(pi, old, ref, rw, tl, old_tl, mask, kl_coef=0.1, eps=0.15, R=1.3)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    assert 0 < float(m["policy_clipfrac"]) < 1
    # q and w come from the sequence log-probs, so the token gradient can be checked by FD
    with jax.enable_x64(True):
        rest = [jnp.asarray(x, jnp.float64) for x in (old_tl, mask, pi, old, ref, rw)]

        def f(x):
            return tokenwise_call(jnp.asarray(x).reshape(tl.shape), *rest)[0]

        x0 = tl.astype(np.float64).ravel()
        g = np.asarray(jax.grad(f)(x0))
        fd = ref_np.central_diff(jax.jit(f), x0)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # garbage under mask 0 changes neither the loss nor the gradient of real tokens
    junk = np.where(mask > 0, tl, np.nan).astype(np.float32)
    junk_old = np.where(mask > 0, old_tl, np.inf).astype(np.float32)
    args = [jnp.asarray(x) for x in (mask, pi, old, ref, rw)]
    lj = tokenwise_call(jnp.asarray(junk), jnp.asarray(junk_old), *args)[0]
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    gj = jax.grad(lambda x: tokenwise_call(x, jnp.asarray(junk_old), *args)[0])(jnp.asarray(junk))
    gt = jax.grad(lambda x: tokenwise_call(x, jnp.asarray(old_tl), *args)[0])(jnp.asarray(tl))
    np.testing.assert_allclose(gj, gt, rtol=1e-6)
