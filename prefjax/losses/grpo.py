"""GRPO and its variants: group-normalised advantages, clipped surrogate, k3 KL, aggregations.

GRPO (Shao et al. 2024, arXiv 2402.03300), Dr. GRPO (Liu et al. 2025, arXiv 2503.20783:
`scale_rewards="none"`, `loss_type="dr_grpo"`), DAPO (Yu et al. 2025, arXiv 2503.14476:
clip-higher `epsilon_high`, token-level `loss_type="dapo"`, dynamic sampling), GSPO (Zheng et al.
2025, arXiv 2507.18071: `importance_sampling_level="sequence"`, the length-normalised sequence
ratio), and truncated importance sampling (TIS, Yao et al. 2025) against the sampler's log-probs.

Rollout layout (prefjax.pipeline.rollouts): k samples of B prompts are k*B rows, sample-major:
row `i*B + j` is sample i of prompt j. All [b, t] tensors use the token alignment of
prefjax.typing (loss_mask 1 on response tokens). Advantages are computed once per rollout
(`group_advantages`), so the loss is a plain function of the rows it is given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import masked_mean, safe_div
from prefjax.typing import Array, Batch, Metrics, PolicyOut

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IS_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)


def _std(x: Array, axis=None) -> Array:
    """Bessel-corrected std (as torch.std / TRL's nanstd); 0 for a single element."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis))
    return jnp.std(x, axis=axis, ddof=1)


def groups(x: Array, k: int, who: str = "group_advantages") -> Array:
    """[k*B] sample-major rows -> [k, B] (column j: the k samples of prompt j)."""
    if x.ndim != 1 or x.shape[0] % k:
        raise ValueError(f"{who}: expected [k*B] rows with k={k} samples per prompt, got shape "
                         f"{x.shape}")
    return x.reshape(k, -1)


def group_advantages(rewards: Array, k: int, *, scale_rewards: str = "group"
                     ) -> tuple[Array, Array]:
    """GRPO advantages [k*B] from rewards [k*B] (sample-major), and a [k*B] flag of rows whose
    group's rewards are all equal (DAPO's dynamic sampling drops those groups).

    A = (r - mean of the prompt's k rewards) / (std + 1e-4), the std over the group
    (`scale_rewards="group"`), over the whole batch ("batch"), or no division ("none", Dr. GRPO).
    One sample per prompt gives A = 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    r = groups(rewards.astype(jnp.float32), k)
    adv = r - jnp.mean(r, axis=0, keepdims=True)
    if scale_rewards == "group":
        adv = adv / (_std(r, axis=0)[None] + STD_EPS)
    elif scale_rewards == "batch":
        adv = adv / (_std(r) + STD_EPS)
    flat = jnp.all(r == r[:1], axis=0)
    return adv.reshape(-1), jnp.broadcast_to(flat[None], r.shape).reshape(-1)


def tis_weights(old_token_logps: Array, sample_token_logps: Array, mask: Array, cap: float
                ) -> Array:
    """Truncated importance weights min(pi_trainer / pi_sampler, cap) per token [b, t]
    (detached; 1 outside the mask)."""
    m = mask > 0
    d = jnp.where(m, old_token_logps - sample_token_logps, 0)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(d), cap))


def _need(who: str, batch: Batch, key: str, shape: tuple) -> Array:
    if key not in batch:
        raise ValueError(f"{who}: batch has no {key!r} {list(shape)}; the rollout must provide it")
    if batch[key].shape != shape:
        raise ValueError(f"{who}: batch[{key!r}] has shape {batch[key].shape}, expected {shape}")
    return batch[key]


def token_advantages(who: str, batch: Batch, shape: tuple) -> Array:
    """batch["advantages"] as [b, t] (a sequence advantage [b] is broadcast over t)."""
    if "advantages" not in batch:
        raise ValueError(f"{who}: batch has no 'advantages' ([b] or [b, t])")
    a = batch["advantages"]
    if a.shape == shape[:1]:
        return jnp.broadcast_to(a[:, None], shape)
    if a.shape != shape:
        raise ValueError(f"{who}: batch['advantages'] has shape {a.shape}, expected "
                         f"{shape[:1]} or {shape}")
    return a


def grpo_per_token(out: PolicyOut, batch: Batch, *, epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0,
                   importance_sampling_level: str = "token", tis_cap: float | None = None
                   ) -> tuple[Array, dict]:
    """The per-token loss [b, t] (0 outside the mask; TRL's `per_token_loss`) and the pieces the
    metrics read. Batch: loss_mask, old_token_logps, advantages ([b] or [b, t]); with beta > 0
    ref_token_logps; with tis_cap sample_token_logps (all [b, t])."""
    shape = out.token_logps.shape
    mask = _need("grpo", batch, "loss_mask", shape)
    m = mask > 0
    mf = m.astype(out.token_logps.dtype)
    sd = jax.lax.stop_gradient
    # where, not a product: padded positions may hold anything (inf, NaN)
    lp = jnp.where(m, out.token_logps, 0)
    old = jnp.where(m, sd(_need("grpo", batch, "old_token_logps", shape)), 0)
    adv = jnp.where(m, sd(token_advantages("grpo", batch, shape)), 0)
    log_ratio = lp - old
    if importance_sampling_level == "sequence":
        log_w = safe_div(jnp.sum(log_ratio * mf, -1), jnp.sum(mf, -1))[:, None]
    else:
        log_w = log_ratio
    coef1 = jnp.exp(log_w)
    eh = epsilon if epsilon_high is None else epsilon_high
    coef2 = jnp.clip(coef1, 1 - epsilon, 1 + eh)
    per_tok = -jnp.minimum(coef1 * adv, coef2 * adv)
    extra = {"coef1": jnp.broadcast_to(sd(coef1), shape), "adv": adv, "mask": mf}
    if tis_cap is not None:
        w = tis_weights(old, _need("grpo", batch, "sample_token_logps", shape), mask, tis_cap)
        per_tok = per_tok * w
        extra["tis"] = w
    if beta:
        ref = jnp.where(m, sd(_need("grpo", batch, "ref_token_logps", shape)), 0)
        kl = jnp.exp(ref - lp) - (ref - lp) - 1
        per_tok = per_tok + beta * kl
        extra["kl"] = sd(kl)
    return jnp.where(m, per_tok, 0), extra


def aggregate(per_tok: Array, mask: Array, loss_type: str, max_completion_length: int = 0
              ) -> Array:
    """The scalar loss from a per-token loss [b, t] (0 outside `mask`).

    grpo: mean over rows of each row's token mean; dapo / bnpo: token mean over the batch (equal
    in prefjax: accumulation is exact, so both see the whole rollout batch); dr_grpo: sum over
    the batch / (rows * max_completion_length), the constant normaliser (0: the batch's t).
    Rows with no response token (dropped by dynamic sampling) count in no normaliser.
    """
    mf = (mask > 0).astype(per_tok.dtype)
    row_tok = jnp.sum(mf, -1)
    rows = jnp.sum((row_tok > 0).astype(per_tok.dtype))
    if loss_type == "grpo":
        return safe_div(jnp.sum(safe_div(jnp.sum(per_tok, -1), row_tok)), rows)
    if loss_type in ("dapo", "bnpo"):
        return safe_div(jnp.sum(per_tok), jnp.sum(row_tok))
    if loss_type == "dr_grpo":
        return safe_div(jnp.sum(per_tok), rows * (max_completion_length or per_tok.shape[-1]))
    raise ValueError(f"grpo: unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def grpo(out: PolicyOut, batch: Batch, *, loss_type: str = "dapo", epsilon: float = 0.2,
         epsilon_high: float | None = None, beta: float = 0.0,
         importance_sampling_level: str = "token", max_completion_length: int = 0,
         tis_cap: float | None = None) -> tuple[Array, Metrics]:
    """GRPO-family policy loss (defaults: TRL 1.16's GRPOConfig).

    Per token: -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) [x min(pi_old / pi_sampler,
    tis_cap)] + beta k3(pi, ref), with w = pi / pi_old per token, or GSPO's
    exp(mean_t log(pi / pi_old)) per sequence (`importance_sampling_level="sequence"`);
    aggregated by `loss_type` (see `aggregate`). Batch keys: see `grpo_per_token`.
    """
    per_tok, x = grpo_per_token(out, batch, epsilon=epsilon, epsilon_high=epsilon_high,
                                beta=beta, importance_sampling_level=importance_sampling_level,
                                tis_cap=tis_cap)
    mask = batch["loss_mask"]
    loss = aggregate(per_tok, mask, loss_type, max_completion_length)
    eh = epsilon if epsilon_high is None else epsilon_high
    c1, adv, mf = x["coef1"], x["adv"], x["mask"]
    low = ((c1 < 1 - epsilon) & (adv < 0)).astype(mf.dtype)
    high = ((c1 > 1 + eh) & (adv > 0)).astype(mf.dtype)
    metrics = {"loss": loss, "clip_ratio/low_mean": masked_mean(low, mf),
               "clip_ratio/high_mean": masked_mean(high, mf),
               "clip_ratio/region_mean": masked_mean(low + high, mf),
               "policy/ratio_mean": masked_mean(c1, mf)}
    if "kl" in x:
        metrics["kl"] = masked_mean(x["kl"], mf)
    if "tis" in x:
        metrics["tis/weight_mean"] = masked_mean(x["tis"], mf)
        metrics["tis/truncated_fraction"] = masked_mean(
            (x["tis"] >= tis_cap).astype(mf.dtype), mf)
    return loss, metrics


def check_pg(who: str, h: dict) -> None:
    """Checks shared by the policy-gradient losses (grpo, rloo)."""
    v.positive(who, "epsilon", h["epsilon"])
    if h["epsilon"] >= 1:
        raise ValueError(f"loss {who!r}: hyperparameter epsilon={h['epsilon']!r} is invalid; "
                         "expected a number in (0, 1) (the ratio is clipped below at 1 - epsilon)")
    if h["epsilon_high"] is not None:
        v.positive(who, "epsilon_high", h["epsilon_high"])
    if h["tis_cap"] is not None and v.number(who, "tis_cap", h["tis_cap"]) < 1:
        raise ValueError(f"loss {who!r}: hyperparameter tis_cap={h['tis_cap']!r} is invalid; "
                         "expected None (off) or a number >= 1 (the importance weight's cap C)")


def check_grpo(h: dict) -> None:
    check_pg("grpo", h)
    v.one_of("grpo", "loss_type", h["loss_type"], LOSS_TYPES)
    v.non_negative("grpo", "beta", h["beta"])
    v.one_of("grpo", "importance_sampling_level", h["importance_sampling_level"], IS_LEVELS)
    mcl = h["max_completion_length"]
    if isinstance(mcl, bool) or not isinstance(mcl, int) or mcl < 0:
        raise ValueError(f"loss 'grpo': hyperparameter max_completion_length={mcl!r} is invalid; "
                         "expected an int >= 0 (0: the batch's sequence length)")


def grpo_batch(rows, out, ref, scores, o):
    """The rollout's loss batch (a record's `rollout.batch`): group advantages of the scores
    (`o.num_generations`, `o.scale_rewards`), the sampling policy's and the reference's token
    log-probs; with `o.dynamic_sampling` the rows of groups whose rewards are all equal get an
    empty loss mask (DAPO: they carry no signal, and count in no normaliser)."""
    adv, flat = group_advantages(scores, o.num_generations, scale_rewards=o.scale_rewards)
    mask = rows["loss_mask"]
    if o.dynamic_sampling:
        mask = jnp.where(flat[:, None], 0, mask)
    return {**rows, "loss_mask": mask, "advantages": adv, "old_token_logps": out.token_logps,
            "ref_token_logps": ref.token_logps}
