"""RLOO (Ahmadian et al. 2024, arXiv 2402.14740) and the REINFORCE++ baseline (Hu et al. 2025,
arXiv 2501.03262): REINFORCE with a per-prompt baseline over k samples, KL to the reference in
the reward.

Rollout layout as prefjax.losses.grpo: k*B rows, sample-major (row `i*B + j` is sample i of
prompt j). KL shaping (`kl_shaped_returns`): sequence level, R = score - kl_coef * sum_t k1_t
(TRL's RLOOTrainer with beta = kl_coef); or token level, the per-token reward
-kl_coef * k1_t + score [last token] summed from t to the end (reward-to-go G_t). Baselines use
each sample's total return R = G_0:

  RLOO:         b_i = mean of the other k - 1 samples' R of the same prompt.
  REINFORCE++:  b_i = mean of all k samples' R of the prompt, then A is normalised over the
                batch (mean 0, std 1: "REINFORCE++-baseline").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses._common import masked_mean, safe_div
from prefjax.losses.grpo import STD_EPS, _need, _std, check_pg, groups, tis_weights
from prefjax.typing import Array, Batch, Metrics, PolicyOut

KL_LEVELS = ("sequence", "token")


def kl_shaped_returns(scores: Array, logps: Array, ref_logps: Array, mask: Array, *,
                      kl_coef: float, level: str = "sequence") -> Array:
    """Returns with the KL penalty to the reference: [b] (sequence level) or the reward-to-go
    [b, t] (token level, 0 outside the mask). logps / ref_logps [b, t] of the sampling policy
    and the reference (k1 = log pi - log ref per token), scores [b]."""
    m = mask > 0
    k1 = jnp.where(m, logps - ref_logps, 0)
    if level == "sequence":
        return scores - kl_coef * jnp.sum(k1, -1)
    if level != "token":
        raise ValueError(f"kl level must be one of {KL_LEVELS}, got {level!r}")
    # reward-to-go: G_t = score - kl_coef * sum_{s >= t} k1_s on response tokens
    to_go = jnp.flip(jnp.cumsum(jnp.flip(k1, -1), -1), -1)
    return jnp.where(m, scores[:, None] - kl_coef * to_go, 0)


def _total(returns: Array, mask: Array) -> Array:
    """Each row's total return R [b]: itself at sequence level, G at the first response token."""
    if returns.ndim == 1:
        return returns
    m = mask > 0
    first = jnp.argmax(m, axis=-1)
    return jnp.where(jnp.any(m, -1), jnp.take_along_axis(returns, first[:, None], -1)[:, 0], 0)


def _minus_baseline(returns: Array, mask: Array, baseline: Array) -> Array:
    if returns.ndim == 1:
        return returns - baseline
    return jnp.where(mask > 0, returns - baseline[:, None], 0)


def rloo_advantages(returns: Array, mask: Array, k: int, *, normalize: bool = False) -> Array:
    """A = R - leave-one-out mean of the prompt's other samples' R; returns [b] or [b, t] (then
    the baseline is subtracted from every G_t). k = 1 has no baseline: A = 0. `normalize`
    whitens A over the batch (TRL's normalize_advantages; over response tokens at token level)."""
    if k < 2:
        return jnp.zeros_like(returns)
    r = groups(_total(returns, mask), k, "rloo_advantages")
    base = ((jnp.sum(r, 0, keepdims=True) - r) / (k - 1)).reshape(-1)
    adv = _minus_baseline(returns, mask, base)
    return _whiten(adv, mask) if normalize else adv


def reinforce_pp_advantages(returns: Array, mask: Array, k: int) -> Array:
    """REINFORCE++-baseline: A = R - mean of the prompt's k samples' R, then (A - mean) /
    (std + 1e-4) over the batch (over response tokens at token level)."""
    r = groups(_total(returns, mask), k, "reinforce_pp_advantages")
    base = jnp.broadcast_to(jnp.mean(r, 0, keepdims=True), r.shape).reshape(-1)
    return _whiten(_minus_baseline(returns, mask, base), mask)


def _whiten(adv: Array, mask: Array) -> Array:
    if adv.ndim == 1:
        return (adv - jnp.mean(adv)) / (_std(adv) + STD_EPS)
    m = (mask > 0).astype(adv.dtype)
    mu = masked_mean(adv, m)
    n = jnp.sum(m)
    var = safe_div(jnp.sum(jnp.square(adv - mu) * m), n - 1)
    return jnp.where(m > 0, (adv - mu) / (jnp.sqrt(var) + STD_EPS), 0)


def rloo(out: PolicyOut, batch: Batch, *, epsilon: float = 0.2,
         epsilon_high: float | None = None, tis_cap: float | None = None
         ) -> tuple[Array, Metrics]:
    """Clipped REINFORCE loss, mean over sequences (defaults: TRL 1.16's RLOOConfig).

    Sequence advantages [b]: the ratio is the sequence's pi(y|x) / pi_old(y|x) (TRL's
    RLOOTrainer), loss = -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) per row. Token
    advantages [b, t]: the same per token, summed over each row's tokens. Batch keys:
    loss_mask, old_token_logps [b, t], advantages, and with tis_cap sample_token_logps [b, t]
    (weight min(pi_old / pi_sampler, C) of the sequence, or of each token).
    """
    shape = out.token_logps.shape
    mask = _need("rloo", batch, "loss_mask", shape)
    m = mask > 0
    mf = m.astype(out.token_logps.dtype)
    sd = jax.lax.stop_gradient
    lp = jnp.where(m, out.token_logps, 0)
    old = jnp.where(m, sd(_need("rloo", batch, "old_token_logps", shape)), 0)
    if "advantages" not in batch or batch["advantages"].shape not in (shape[:1], shape):
        raise ValueError(f"rloo: batch needs 'advantages' of shape {shape[:1]} or {shape}")
    token_level = batch["advantages"].shape == shape
    adv = sd(batch["advantages"])
    eh = epsilon if epsilon_high is None else epsilon_high
    w = None
    if tis_cap is not None:
        sample = _need("rloo", batch, "sample_token_logps", shape)
        w = tis_weights(old, sample, mask, tis_cap)
    if token_level:
        adv = jnp.where(m, adv, 0)
        coef1 = jnp.exp(lp - old)
    else:
        coef1 = jnp.exp(jnp.sum(lp - old, -1))
        if w is not None:  # the sequence's weight: the product of the per-token ratios, capped
            d = jnp.sum(jnp.where(m, old - sample, 0), -1)
            w = sd(jnp.minimum(jnp.exp(d), tis_cap))
    coef2 = jnp.clip(coef1, 1 - epsilon, 1 + eh)
    per = -jnp.minimum(coef1 * adv, coef2 * adv)
    if w is not None:
        per = per * w
    if token_level:
        per = jnp.sum(jnp.where(m, per, 0), -1)
    loss = jnp.mean(per)
    c1 = sd(coef1)
    low = ((c1 < 1 - epsilon) & (adv < 0)).astype(mf.dtype)
    high = ((c1 > 1 + eh) & (adv > 0)).astype(mf.dtype)
    avg = (lambda x: masked_mean(x, mf)) if token_level else jnp.mean  # noqa: E731
    metrics = {"loss": loss, "clip_ratio/low_mean": avg(low), "clip_ratio/high_mean": avg(high),
               "clip_ratio/region_mean": avg(low + high), "policy/ratio_mean": avg(c1)}
    if w is not None:
        metrics["tis/weight_mean"] = avg(w)
    return loss, metrics


def check_rloo(h: dict) -> None:
    check_pg("rloo", h)


def rloo_batch(rows, out, ref, scores, o):
    """The rollout's loss batch: KL-shaped returns (`o.kl_coef`, `o.kl_level`), leave-one-out
    advantages over `o.num_generations` samples (`o.normalize_advantages`)."""
    mask = rows["loss_mask"]
    ret = kl_shaped_returns(scores, out.token_logps, ref.token_logps, mask, kl_coef=o.kl_coef,
                            level=o.kl_level)
    adv = rloo_advantages(ret, mask, o.num_generations, normalize=o.normalize_advantages)
    return {**rows, "advantages": adv, "old_token_logps": out.token_logps}


def reinforce_pp_batch(rows, out, ref, scores, o):
    """As `rloo_batch` with the REINFORCE++-baseline advantages (group mean, batch-normalised)."""
    mask = rows["loss_mask"]
    ret = kl_shaped_returns(scores, out.token_logps, ref.token_logps, mask, kl_coef=o.kl_coef,
                            level=o.kl_level)
    return {**rows, "advantages": reinforce_pp_advantages(ret, mask, o.num_generations),
            "old_token_logps": out.token_logps}
