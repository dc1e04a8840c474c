"""SFT and Bradley-Terry reward losses vs float64 NumPy, gradients, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np

RTOL, ATOL = 1e-5, 1e-6


def tokens(seed, b=4, t=7):
    r = np.random.default_rng(seed)
    mask = (r.uniform(size=(b, t)) < 0.7).astype(np.int32)
    mask[:, 0] = 0  # position 0 is never scored
    tl = np.where(mask > 0, -r.uniform(0.01, 5.0, (b, t)), 0).astype(np.float32)
    return tl, mask


def sft_call(tl, mask, **kw):
    tl = jnp.asarray(tl)
    out = PolicyOut(tl, tl.sum(-1), jnp.asarray(mask).sum(-1).astype(tl.dtype))
    return losses.get("sft", **kw)(out, {"loss_mask": jnp.asarray(mask)})


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_sft_matches_numpy_and_ignores_padding(reduction):
    tl, mask = tokens(0)
    loss, metrics = sft_call(tl, mask, reduction=reduction)
    np.testing.assert_allclose(loss, ref_np.sft(tl, mask, reduction), rtol=RTOL)
    np.testing.assert_allclose(metrics["num_tokens"], mask.sum())
    # garbage under mask 0, in place and in extra padding columns
    junk = np.where(mask > 0, tl, np.nan).astype(np.float32)
    junk = np.concatenate([junk, np.full((4, 3), -np.inf, np.float32)], axis=1)
    jmask = np.concatenate([mask, np.zeros((4, 3), np.int32)], axis=1)
    out = PolicyOut(jnp.asarray(junk), jnp.asarray(tl.sum(-1)), jnp.asarray(mask.sum(-1)))
    loss_pad = losses.get("sft", reduction=reduction)(out, {"loss_mask": jnp.asarray(jmask)})[0]
    np.testing.assert_allclose(loss_pad, loss, rtol=1e-6)
    g = jax.grad(lambda x: losses.get("sft", reduction=reduction)(
        out._replace(token_logps=x), {"loss_mask": jnp.asarray(jmask)})[0])(jnp.asarray(junk))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[jmask == 0] == 0)
    # closed form: -1 / (tokens) per scored token, or -1 / b per token for the sequence sum
    scale = mask.sum() if reduction == "token_mean" else mask.shape[0]
    np.testing.assert_allclose(np.asarray(g)[jmask > 0], -1.0 / scale, rtol=1e-6)


def bt_call(scores, margin=None, **kw):
    out = PolicyOut(jnp.zeros((len(scores), 1)), jnp.zeros(len(scores)), jnp.ones(len(scores)),
                    scores=jnp.asarray(scores))
    batch = {} if margin is None else {"margin": jnp.asarray(margin)}
    return losses.get("reward_bt", **kw)(out, batch)


@pytest.mark.parametrize("with_margin,center", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_reward_bt_matches_numpy(with_margin, center):
    r = np.random.default_rng(1)
    scores = r.normal(0, 2, 10).astype(np.float32)
    margin = r.uniform(0, 1, 5).astype(np.float32) if with_margin else None
    loss, m = bt_call(scores, margin, center_coef=center)
    np.testing.assert_allclose(loss, ref_np.bradley_terry(scores, margin, center), rtol=RTOL)
    s = scores.astype(np.float64)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(s[:5] > s[5:]))
    np.testing.assert_allclose(m["rewards/margins"], np.mean(s[:5] - s[5:]), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(m["rewards/chosen"], s[:5].mean(), rtol=RTOL, atol=ATOL)


def test_reward_bt_gradient_finite_differences():
    r = np.random.default_rng(2)
    scores = r.normal(0, 2, 10)
    margin = r.uniform(0, 1, 5)
    with jax.enable_x64(True):
        def f(x):
            return bt_call(jnp.asarray(x, jnp.float64), jnp.asarray(margin),
                           center_coef=0.05)[0]

        g = np.asarray(jax.grad(f)(scores))
        fd = ref_np.central_diff(jax.jit(f), scores)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_reward_bt_needs_scores():
    out = PolicyOut(jnp.zeros((2, 1)), jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="scores"):
        losses.get("reward_bt")(out, {})
