"""Small array helpers shared by the losses: stable log-sigmoid, pair splitting, masked means.

Every reduction here is over the whole batch a loss is given (e.g. `chosen_nll` divides by all
chosen tokens of the batch). That is also the batch of an accumulated step: the train step calls
the loss once on the full batch's outputs (`prefjax.typing.LossFn`), never on a micro-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.typing import Array, Batch, PolicyOut


def log_sigmoid(z: Array) -> Array:
    """log sigma(z) = -softplus(-z), finite for any float z."""
    return -jax.nn.softplus(-z)


def safe_div(num: Array, den: Array) -> Array:
    """num / den where den != 0, else 0 (gradients stay finite for empty rows / masks)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of `x` over positions where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.astype(x.dtype)
    return safe_div(jnp.sum(x * mask), jnp.sum(mask))


def masked_var(x: Array, mask: Array, *, unbiased: bool = True) -> Array:
    """Variance of `x` over the mask; `unbiased` applies Bessel's correction (as TRL's whiten)."""
    mask = mask.astype(x.dtype)
    n = jnp.sum(mask)
    mu = masked_mean(x, mask)
    var = safe_div(jnp.sum(jnp.square(x - mu) * mask), n)
    return var * safe_div(n, n - 1) if unbiased else var


def num_pairs(b: int, who: str) -> int:
    """n = b // 2 for a pairwise batch of b rows; fails (at trace time) on an odd row count."""
    if b % 2:
        raise ValueError(f"{who}: a pairwise batch needs an even number of rows (chosen rows "
                         f"[:n], rejected rows [n:2n]), got {b}")
    return b // 2


def check_rows(who: str, key: str, x: Array, rows: int) -> Array:
    """Check that a batch entry has `rows` leading rows (shapes are static under jit)."""
    if x.shape[:1] != (rows,):
        raise ValueError(f"{who}: batch[{key!r}] must have {rows} rows, got shape {x.shape}")
    return x


def reference_logps(who: str, batch: Batch, b: int, *, reference_free: bool) -> Array:
    """Reference sequence log-probs [b] from `batch["ref_logps"]`, detached; 0 if reference_free."""
    if reference_free:
        return jnp.zeros((b,), jnp.float32)
    if "ref_logps" not in batch:
        raise ValueError(f"{who}: batch has no 'ref_logps' (reference sequence log-probs, [b]); "
                         "precompute them (prefjax.data.reference) or set reference_free=True")
    return jax.lax.stop_gradient(check_rows(who, "ref_logps", batch["ref_logps"], b))


def pair_inputs(who: str, out: PolicyOut, batch: Batch, *, reference_free: bool = False
                ) -> tuple[Array, Array, Array, Array, Array, Array]:
    """(pi_c, pi_r, ref_c, ref_r, len_c, len_r), each [n], from a pairwise batch of 2n rows."""
    b = out.logps.shape[0]
    n = num_pairs(b, who)
    ref = reference_logps(who, batch, b, reference_free=reference_free)
    lengths = out.lengths.astype(out.logps.dtype)
    return (out.logps[:n], out.logps[n:], ref[:n].astype(out.logps.dtype),
            ref[n:].astype(out.logps.dtype), lengths[:n], lengths[n:])


def chosen_nll(pi_c: Array, len_c: Array) -> Array:
    """Token-mean NLL over all chosen tokens of the batch (TRL's RPO / CPO / ORPO `nll_loss`)."""
    return -safe_div(jnp.sum(pi_c), jnp.sum(len_c))


def pair_metrics(pi_c: Array, pi_r: Array, rw_c: Array, rw_r: Array) -> dict[str, Array]:
    """TRL's metric names from policy log-probs and (already scaled) implicit rewards [n]."""
    rw_c, rw_r = jax.lax.stop_gradient(rw_c), jax.lax.stop_gradient(rw_r)
    return {
        "rewards/chosen": jnp.mean(rw_c),
        "rewards/rejected": jnp.mean(rw_r),
        "rewards/accuracies": jnp.mean((rw_c > rw_r).astype(rw_c.dtype)),
        "rewards/margins": jnp.mean(rw_c - rw_r),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(pi_c)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(pi_r)),
    }
