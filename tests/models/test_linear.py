"""`linear.matmul` / `weight_grad` (the CPU-friendly dense-layer VJP) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models.linear import matmul, weight_grad


def test_matmul_values_and_gradients_match_float64_closed_form():
    r = np.random.default_rng(0)
    x = r.normal(size=(3, 5, 8)).astype(np.float32)  # [b, t, in]: leading axes are tokens
    w = r.normal(size=(8, 6)).astype(np.float32)
    g = r.normal(size=(3, 5, 6)).astype(np.float32)
    f = lambda x, w: jnp.sum(jnp.sin(matmul(x, w)) * g)  # noqa: E731
    y = matmul(jnp.asarray(x), jnp.asarray(w))
    dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y64 = x64 @ w64
    dy = g * np.cos(y64)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy @ w64.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, x64.reshape(-1, 8).T @ dy.reshape(-1, 6), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradient_dtypes_follow_the_operands(dtype):
    x, w = jnp.ones((4, 3), dtype), jnp.ones((3, 2), dtype)
    dx, dw = jax.grad(lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32)), (0, 1))(x, w)
    assert dx.dtype == dw.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((3, 2), 4.0))


def test_weight_grad_accumulates_in_the_requested_dtype():
    r = np.random.default_rng(1)
    x, dy = r.normal(size=(50, 7)), r.normal(size=(50, 9))
    got = jax.jit(lambda a, b: weight_grad(a, b, jnp.float32))(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16))
    assert got.dtype == jnp.float32 and got.shape == (7, 9)
    ref = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64).T @ np.asarray(
        jnp.asarray(dy, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
