"""RLHF with PPO (Ouyang et al. 2022; Huang et al. 2024; TRL): KL-shaped rewards, GAE, clipped loss.

ALGORITHMS.md section 5. All [b, t] tensors use the token alignment of prefjax.typing: `mask`
is the loss mask (1 on response tokens, assumed contiguous per row: prompt, response, padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import masked_mean, masked_var
from prefjax.typing import Array, Batch, Metrics, PolicyOut

ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logps: Array, ref_logps: Array, *, estimator: str = "k1") -> Array:
    """Per-token KL(pi || ref) estimate [b, t] from samples of pi (Schulman 2020, "Approximating
    KL divergence"): k1 = log pi - log ref (unbiased, TRL's default), k2 = k1^2 / 2 (biased,
    low variance, >= 0), k3 = (e^{-k1} - 1) + k1 (unbiased, >= 0; TRL's "k3")."""
    k1 = logps - ref_logps
    if estimator == "k1":
        return k1
    if estimator == "k2":
        return 0.5 * jnp.square(k1)
    if estimator == "k3":
        return jnp.expm1(-k1) + k1
    raise ValueError(f"kl estimator must be one of {ESTIMATORS}, got {estimator!r}")


def adaptive_kl_coef(kl_coef, kl, n_samples, *, target: float, horizon: float,
                     clip: float = 0.2):
    """One update of the adaptive KL controller (Ziegler et al. 2019, eq. 2; TRL's former
    `AdaptiveKLController`): e = clip(kl / target - 1, -clip, clip),
    kl_coef' = kl_coef * (1 + e * n_samples / horizon).

    kl: the rollout's mean per-sequence KL estimate; n_samples: the rollout's sequences;
    horizon: in sequences (Ziegler's K_beta = n_samples / horizon). Works on floats or arrays.
    """
    if not target > 0 or not horizon > 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target!r}, "
                         f"horizon={horizon!r}")
    e = jnp.clip(kl / target - 1.0, -clip, clip)
    return kl_coef * (1.0 + e * n_samples / horizon)


def last_token_onehot(mask: Array) -> Array:
    """[b, t] one-hot of each row's last position with mask 1 (all zeros for an empty row)."""
    t = mask.shape[-1]
    idx = jnp.arange(t)
    last = jnp.max(jnp.where(mask > 0, idx, -1), axis=-1, keepdims=True)
    return (idx == last).astype(jnp.float32)


def kl_shaped_rewards(scores: Array, logps: Array, ref_logps: Array, mask: Array, *,
                      kl_coef: float, estimator: str = "k1") -> Array:
    """r_t = -kl_coef * k(t) on response tokens, plus the score [b] at each row's last response
    token. logps / ref_logps [b, t] are of the sampling policy and the reference. Returns [b, t],
    0 outside the mask.

    TRL's PPOTrainer (0.24, its last release with PPO) adds the score one slot later, on the
    first pad after the last token, and keeps the value there, so its GAE advantages differ at
    lam < 1 on rows shorter than the width; they agree on rows that fill it and at
    gamma = lam = 1 (tests/losses/test_ppo_trl_parity.py runs TRL's code on both layouts)."""
    m = mask > 0
    k = jnp.where(m, kl_penalty(logps, ref_logps, estimator=estimator), 0)
    onehot = last_token_onehot(mask).astype(k.dtype)
    return -kl_coef * k + scores[:, None].astype(k.dtype) * onehot


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Array, Array]:
    """Generalised advantage estimation over [b, t]; V = 0 after each row's last token.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns R = A + V,
    all 0 outside the mask. Runs a reverse `lax.scan` over t.
    """
    m = (mask > 0).astype(values.dtype)
    r, val = rewards * m, values * m

    def step(carry, xs):
        a_next, v_next = carry
        r_t, v_t, m_t = xs
        a_t = (r_t + gamma * v_next - v_t + gamma * lam * a_next) * m_t
        # outside the mask the carry restarts at 0: "V = 0 after the last token"
        return (a_t, v_t * m_t), a_t

    zeros = jnp.zeros(values.shape[:1], values.dtype)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, val.T, m.T), reverse=True)
    adv = adv.T
    return adv, (adv + val) * m


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, unbiased: bool = True) -> Array:
    """(x - mean) / std over the mask (TRL: Bessel-corrected variance, eps 1e-8); with
    shift_mean=False the mean is added back (rescale only). 0 outside the mask."""
    mu = masked_mean(x, mask)
    out = (x - mu) * jax.lax.rsqrt(masked_var(x, mask, unbiased=unbiased) + 1e-8)
    if not shift_mean:
        out = out + mu
    return jnp.where(mask > 0, out, 0)


def rollout_metrics(scores: Array, logps: Array, ref_logps: Array, mask: Array, *,
                    kl_coef: float, estimator: str = "k1") -> Metrics:
    """TRL's per-rollout `objective/*` metrics from scores [b] and sampling/ref logps [b, t];
    `objective/kl` is the mean over rows of the summed per-token `estimator` (as TRL)."""
    kl = jnp.where(mask > 0, kl_penalty(logps, ref_logps, estimator=estimator), 0).sum(-1)
    non_score = -kl_coef * kl
    return {"objective/kl": jnp.mean(kl), "objective/non_score_reward": jnp.mean(non_score),
            "objective/rlhf_reward": jnp.mean(non_score + scores),
            "objective/scores": jnp.mean(scores)}


def ppo(out: PolicyOut, batch: Batch, *, clip_eps: float = 0.2, clip_eps_value: float = 0.2,
        vf_coef: float = 0.1) -> tuple[Array, Metrics]:
    """Clipped PPO policy loss + vf_coef * clipped value loss, token-level masked means.

    Reads out.token_logps, out.values [b, t] and batch old_token_logps, advantages (already
    whitened), returns, old_values, loss_mask [b, t]. No entropy bonus: PolicyOut carries no
    entropy (TRL has none either). Defaults are TRL's PPOConfig (cliprange 0.2, cliprange_value
    0.2, vf_coef 0.1). The rollout side (prefjax.pipeline.rollouts, `online.*`) differs from
    TRL in the score's slot (`kl_shaped_rewards`) and where its config says so: value model
    (`online.value_model`, default a head on the policy's trunk; TRL: from the reward model)
    and temperature (default 1; TRL 0.7).
    """
    if out.values is None:
        raise ValueError("ppo: out.values is None; PPO needs a value head filling "
                         "PolicyOut.values [b, t]")
    for key in ("old_token_logps", "advantages", "returns", "old_values", "loss_mask"):
        if key not in batch:
            raise ValueError(f"ppo: batch has no {key!r} ([b, t]); the rollout must provide it")
        if batch[key].shape != out.token_logps.shape:
            raise ValueError(f"ppo: batch[{key!r}] has shape {batch[key].shape}, expected "
                             f"{out.token_logps.shape} like out.token_logps")
    mask = batch["loss_mask"]
    m = mask > 0
    # zero padded positions of every input first: they may hold anything (inf, NaN), and a masked
    # product like 0 * inf would still poison the loss or its gradient
    adv, ret, old_v, old_lp = (jnp.where(m, batch[k], 0) for k in
                               ("advantages", "returns", "old_values", "old_token_logps"))
    log_ratio = jnp.where(m, out.token_logps, 0) - old_lp
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_loss = masked_mean(jnp.where(m, jnp.maximum(pg1, pg2), 0), mask)
    vpred = jnp.where(m, out.values, 0)
    vclip = jnp.clip(vpred, old_v - clip_eps_value, old_v + clip_eps_value)
    vf1, vf2 = jnp.square(vpred - ret), jnp.square(vclip - ret)
    vf_loss = 0.5 * masked_mean(jnp.where(m, jnp.maximum(vf1, vf2), 0), mask)
    loss = pg_loss + vf_coef * vf_loss
    sd = jax.lax.stop_gradient
    lr, ratio_sd = sd(log_ratio), sd(ratio)
    fdt = loss.dtype
    return loss, {
        "loss": loss,
        "loss/policy_avg": sd(pg_loss),
        "loss/value_avg": sd(vf_loss),
        "policy/approxkl_avg": 0.5 * masked_mean(jnp.square(lr), mask),
        "policy/clipfrac_avg": masked_mean((sd(pg2) > sd(pg1)).astype(fdt), mask),
        "val/clipfrac_avg": masked_mean((sd(vf2) > sd(vf1)).astype(fdt), mask),
        "val/ratio": masked_mean(ratio_sd, mask),
        "val/ratio_var": masked_var(ratio_sd, mask, unbiased=False),
    }


def check_ppo(h: dict) -> None:
    v.positive("ppo", "clip_eps", h["clip_eps"])
    v.positive("ppo", "clip_eps_value", h["clip_eps_value"])
    v.non_negative("ppo", "vf_coef", h["vf_coef"])
