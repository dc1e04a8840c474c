"""AdamW whose two moments are stored in a low-precision dtype (bf16) and computed in float32.

Halves the optimizer's memory (8 -> 4 bytes per parameter). optax's `mu_dtype` covers only the
first moment; the second one is the problem: with b2 = 0.999 the per-step relative change of
`nu` (1e-3) is below half a bf16 ulp (2^-9), so round-to-nearest would leave `nu` stuck (it
neither decays nor grows once it is large enough). Both moments are therefore written back with
*stochastic* rounding: each stored value is one of the two bf16 neighbours of the float32 value,
picked with probabilities that make it unbiased, so the moving averages track their float32
counterparts in expectation. The random bits come from `fold_in(key(seed), count)` per leaf: no
extra state, and a resumed run draws the same bits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """float32 `x` -> `dtype` (bf16), rounding up with probability equal to the dropped fraction.

    Adds 16 random low bits to the float32 bit pattern and truncates them: exact for values that
    already are bf16, and never more than one bf16 ulp away. float32 `dtype` returns `x`.
    """
    x = x.astype(jnp.float32)
    if jnp.dtype(dtype) == jnp.float32:
        return x
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"stochastic_round supports bfloat16 or float32, got {dtype}")
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    bits = (bits + noise) & jnp.uint32(0xFFFF0000)
    # finite and inf values stay in range; NaN stays NaN (its exponent bits are all set)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.bfloat16)


def scale_by_adam_lowp(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       moment_dtype: Any = jnp.bfloat16,
                       seed: int = 0) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with `mu` and `nu` stored as `moment_dtype` (stochastically rounded).

    The state is an `optax.ScaleByAdamState` (count, mu, nu) with the moments in `moment_dtype`;
    the arithmetic (moving averages, bias correction, the ratio) is float32.
    """
    dtype = jnp.dtype(moment_dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        key = jax.random.fold_in(jax.random.key(seed), count)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates,
                          state.nu)
        # the update reads the moments as stored, so it is a function of the state alone
        mu_s = _store(mu, dtype, jax.random.fold_in(key, 0))
        nu_s = _store(nu, dtype, jax.random.fold_in(key, 1))
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(
            lambda g, m, v: ((f32(m) / c1) / (jnp.sqrt(f32(v) / c2) + eps)).astype(g.dtype),
            updates, mu_s, nu_s)
        return out, optax.ScaleByAdamState(count=count, mu=mu_s, nu=nu_s)

    return optax.GradientTransformation(init, update)


def _store(tree, dtype, key):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        stochastic_round(x, dtype, jax.random.fold_in(key, i)) for i, x in enumerate(leaves)])


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4, *, moment_dtype: Any = jnp.float32,
          seed: int = 0) -> optax.GradientTransformation:
    """AdamW with moments in `moment_dtype`: float32 is `optax.adamw` itself; bfloat16 stores
    both moments in bf16 (`scale_by_adam_lowp`)."""
    if jnp.dtype(moment_dtype) == jnp.float32:
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(
        scale_by_adam_lowp(b1, b2, eps, moment_dtype=moment_dtype, seed=seed),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate))
