"""`x @ w` for dense layers, with a weight gradient that XLA CPU computes several times faster.

The weight gradient of `y = x @ w` is `x^T dy`, a product that contracts the token axis of both
operands. Left alone, XLA CPU feeds its matrix library by transposing one operand, often the
wider one (`dy`, e.g. [tokens, 688] for an MLP's gate), fused with the elementwise backward of
the next op (SiLU, ...) into a transposed copy that runs far below memory speed.
Transposing `x` on its own, behind an optimization barrier, makes the product canonical: the
benchmark Llama's policy forward + backward went from ~700 to ~600 ms on 2 CPU cores
(benchmarks/README.md). Other backends (GPU/TPU) read transposed operands natively and take
the plain product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
    """x [..., in] @ w [in, out] -> [..., out], in the operands' (common) dtype."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _weight_grad_cpu(x2: Array, dy2: Array, dtype) -> Array:
    # the barrier keeps XLA from folding the transpose back into the dot's dimension numbers;
    # transposing dy instead when it is the narrower side measured no faster
    xt = jax.lax.optimization_barrier(x2.T)
    return jnp.matmul(xt, dy2, preferred_element_type=dtype)


def weight_grad(x: Array, dy: Array, dtype=None) -> Array:
    """x^T dy [in, out] for x [n, in], dy [n, out] (`dtype`: the accumulation/result dtype,
    default the operands'): on CPU, x is transposed on its own first (module docstring)."""
    dtype = dtype or jnp.result_type(x, dy)
    return jax.lax.platform_dependent(
        x, dy, cpu=lambda a, b: _weight_grad_cpu(a, b, dtype),
        default=lambda a, b: jnp.matmul(a.T, b, preferred_element_type=dtype))


def _matmul_bwd(res, dy):
    x, w = res
    dw = weight_grad(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
