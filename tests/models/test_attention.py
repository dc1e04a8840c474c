"""`cache.attend` (head-major scores, explicit backward) against a plain float64 re-derivation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from prefjax.models import cache as kvc


def _reference(q, k, v, allowed, scale):
    """Masked softmax attention in float64 NumPy, the textbook [b, h, t, s] way."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(np.asarray(allowed)[:, None], s, -np.inf)
    s = s - np.max(np.where(np.isinf(s), -1e300, s), axis=-1, keepdims=True)
    p = np.exp(s)
    empty = p.sum(-1, keepdims=True) == 0  # a query with no visible key averages uniformly
    p = np.where(empty, 1.0, p)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def _inputs(b=3, t=7, h=4, kh=2, d=8, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.float32)
               for s in ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0  # left padding: its first queries see no key at all
    mask[2, 5:] = 0  # right padding
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
def test_attend_matches_float64_reference(window, heads):
    q, k, v, mask = _inputs(h=heads[0], kh=heads[1])
    allowed = kvc.causal_allowed(mask, 0, q.shape[1], window)
    out = kvc.attend(q, k, v, allowed, 0.3)
    np.testing.assert_allclose(out, _reference(q, k, v, allowed, 0.3), rtol=1e-5, atol=1e-6)


def test_attend_gradients_match_finite_differences():
    q, k, v, mask = _inputs()
    allowed = kvc.causal_allowed(mask, 0, q.shape[1], 4)
    check_grads(lambda q, k, v: jnp.sin(kvc.attend(q, k, v, allowed, 0.3)), (q, k, v),
                order=1, modes=["rev"], atol=2e-3, rtol=2e-3)


def test_attend_gradients_match_autodiff_of_the_plain_form():
    """The explicit backward equals autodiff of masked softmax attention (incl. empty rows)."""
    q, k, v, mask = _inputs(seed=1)
    allowed = kvc.causal_allowed(mask, 0, q.shape[1])

    def plain(q, k, v):
        g = q.shape[2] // k.shape[2]
        kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, kr) * 0.3
        s = jnp.where(allowed[:, None], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), vr)

    w = jax.random.normal(jax.random.key(2), q.shape)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))  # noqa: E731
    got = jax.grad(loss(lambda q, k, v: kvc.attend(q, k, v, allowed, 0.3)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a query that sees no key is a constant of q: its gradient is exactly zero
    assert not np.any(np.asarray(got[0])[1, :3])


def test_attend_bf16_keeps_dtypes_and_stays_close():
    q, k, v, mask = _inputs()
    allowed = kvc.causal_allowed(mask, 0, q.shape[1])
    f = lambda q, k, v: jnp.sum(kvc.attend(q, k, v, allowed, 0.3).astype(jnp.float32) ** 2)  # noqa: E731
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = kvc.attend(*lo, allowed, 0.3)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, allowed, 0.3),
                               atol=5e-2)
    g16, g32 = jax.grad(f, (0, 1, 2))(*lo), jax.grad(f, (0, 1, 2))(q, k, v)
    for a, b in zip(g16, g32, strict=True):
        assert a.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
        assert err < 3e-2, err
