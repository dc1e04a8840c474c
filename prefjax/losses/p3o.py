"""P3O, Pairwise Proximal Policy Optimization (Wu et al. 2023, arXiv 2310.00212).

ALGORITHMS.md section 4. Rows [:n] are responses y1 and rows [n:2n] responses y2 to the same
prompts, both sampled from pi_old. With Delta_i = log pi(y_i) - log pi_old(y_i), l_i the current
sequence log-ratio to the reference (detached) and rewards r_i, the pair advantage is
q = sg((r1 - r2) - kl_coef (l1 - l2)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import check_rows, num_pairs, safe_div
from prefjax.typing import Array, Batch, Metrics, PolicyOut

VARIANTS = ("v1", "v2", "official")


def _ppo_term(ratio: Array, adv: Array, eps: float) -> tuple[Array, Array]:
    """PPO's pessimistic surrogate min(rho A, clip(rho) A) and whether the clip was binding."""
    unclipped, clipped = ratio * adv, jnp.clip(ratio, 1 - eps, 1 + eps) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def _tokenwise(qw: Array, tl: Array, old_tl: Array, mask: Array, eps: float
               ) -> tuple[Array, Array]:
    """The clip_tokenwise loss and clip fraction; qw [n], the token tensors [2n, t]."""
    m = mask > 0
    # where, not a product: padded positions may hold anything
    tl, old_tl = jnp.where(m, tl, 0), jnp.where(m, jax.lax.stop_gradient(old_tl), 0)
    s = jnp.concatenate([qw, -qw])[:, None]
    unclipped, clipped = -s * tl, -s * jnp.clip(tl, old_tl - eps, old_tl + eps)
    per_tok = jnp.where(m, jnp.maximum(unclipped, clipped), 0)
    n_tok = jnp.sum(m.astype(tl.dtype))
    return safe_div(jnp.sum(per_tok), n_tok), safe_div(
        jnp.sum((m & (clipped > unclipped)).astype(tl.dtype)), n_tok)


def p3o_loss_from_logps(pi: Array, old: Array, ref: Array, rewards: Array, lengths: Array, *,
                        variant: str = "official", kl_coef: float = 0.05, clip_eps: float = 0.2,
                        cliprange_ratio: float = 10.0, avg_tokenwise: bool = True,
                        scale_q: bool = False,
                        tokens: tuple[Array, Array, Array] | None = None
                        ) -> tuple[Array, Metrics]:
    """P3O loss from sequence log-probs [2n] of policy, sampling policy and reference, rewards
    [2n] and response lengths [2n]. Returns (scalar loss, metrics).

    v1: each response clipped like PPO with advantage +-q/2 (separate clipping, reconstructed).
    v2: PPO clip of rho1 / rho2 with advantage q/2 (joint clipping, reconstructed).
    official: log-space joint clip of d = l1 - l2 around d_old, times the detached pair weight
      w = clip(rho1 rho2, 1/R, R); with avg_tokenwise the pair sum is divided by the number of
      response tokens in the batch instead of the number of pairs.
    scale_q divides q by its (population) std over the batch (the whole batch, also under
      grad_accum: the train step calls the loss once on the full batch's outputs).
    tokens = (token_logps, old_token_logps, loss_mask), each [2n, t], switches official to the
      clip_tokenwise form: every response token's log-prob is clipped around its old value,
      sum_t max(-s log pi_t, -s clip(log pi_t, old_t +- eps)) with s = q w for y1 and -q w for y2,
      divided by the number of response tokens in the batch.
    """
    sd = jax.lax.stop_gradient
    n = pi.shape[0] // 2
    old, ref = sd(old), sd(ref)
    lr = sd(pi - ref)  # l_i at the current theta
    reward_diff = rewards[:n] - rewards[n:]
    q = sd(reward_diff - kl_coef * (lr[:n] - lr[n:]))
    if scale_q:
        q = q / (jnp.std(q) + 1e-8)
    d1, d2 = pi[:n] - old[:n], pi[n:] - old[n:]
    if variant == "v1":
        t1, c1 = _ppo_term(jnp.exp(d1), q / 2, clip_eps)
        t2, c2 = _ppo_term(jnp.exp(d2), -q / 2, clip_eps)
        loss = -jnp.mean(t1 + t2)
        clipfrac = jnp.mean(jnp.concatenate([c1, c2]).astype(pi.dtype))
    elif variant == "v2":
        t, c = _ppo_term(jnp.exp(d1 - d2), q / 2, clip_eps)
        loss = -jnp.mean(t)
        clipfrac = jnp.mean(c.astype(pi.dtype))
    elif variant == "official":
        w = sd(jnp.clip(jnp.exp(d1 + d2), 1 / cliprange_ratio, cliprange_ratio))
        d = (pi[:n] - pi[n:]) - (ref[:n] - ref[n:])
        d_old = (old[:n] - old[n:]) - (ref[:n] - ref[n:])
        unclipped = -q * w * d
        clipped = -q * w * jnp.clip(d, d_old - clip_eps, d_old + clip_eps)
        per_pair = jnp.maximum(unclipped, clipped) / 2
        if tokens is not None:
            loss, clipfrac = _tokenwise(q * w, *tokens, clip_eps)
        elif avg_tokenwise:
            loss = safe_div(jnp.sum(per_pair), jnp.sum(lengths.astype(pi.dtype)))
        else:
            loss = jnp.mean(per_pair)
        if tokens is None:
            clipfrac = jnp.mean((clipped > unclipped).astype(pi.dtype))
    else:
        raise ValueError(f"p3o: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    joint = sd(jnp.exp(d1 + d2))
    hi_first = reward_diff >= 0
    lr_hi = jnp.where(hi_first, lr[:n], lr[n:])
    lr_lo = jnp.where(hi_first, lr[n:], lr[:n])
    return loss, {
        "loss": loss,
        "reward_diff_mean": jnp.mean(reward_diff),
        "reward_diff_abs": jnp.mean(jnp.abs(reward_diff)),
        "reward_diff_std": jnp.std(reward_diff),
        "logratio_chosen_mean": jnp.mean(lr_hi),
        "logratio_lose_mean": jnp.mean(lr_lo),
        "logratio_gap_mean": jnp.mean(lr_hi - lr_lo),
        "ratio_mean": jnp.mean(joint),
        "ratio_max": jnp.max(joint),
        "ratio_min": jnp.min(joint),
        "policy_clipfrac": sd(clipfrac),
        "q_diff_mean": jnp.mean(q),
        "q_diff_abs_mean": jnp.mean(jnp.abs(q)),
        "q_diff_std": jnp.std(q),
    }


def p3o(out: PolicyOut, batch: Batch, *, variant: str = "official", kl_coef: float = 0.05,
        clip_eps: float = 0.2, cliprange_ratio: float = 10.0, avg_tokenwise: bool = True,
        scale_q: bool = False, clip_tokenwise: bool = False) -> tuple[Array, Metrics]:
    """P3O loss; batch keys old_logps, ref_logps, rewards, all [b] (rows [:n] y1, [n:] y2), and
    with clip_tokenwise (official variant only) also old_token_logps and loss_mask [b, t].
    Defaults are the official HH config (kl_coef 0.05, cliprange 0.2, cliprange_ratio 10).
    From a config, kl_coef is `online.kl_coef`, the one KL coefficient of every online
    algorithm (`loss.kl_coef` is an alias of it: `prefjax.config.set_algo` links the two)."""
    b = out.logps.shape[0]
    num_pairs(b, "p3o")
    for key in ("old_logps", "ref_logps", "rewards"):
        if key not in batch:
            raise ValueError(f"p3o: batch has no {key!r} ([b]); the rollout must provide it")
        check_rows("p3o", key, batch[key], b)
    tokens = None
    if clip_tokenwise:
        for key in ("old_token_logps", "loss_mask"):
            if key not in batch or batch[key].shape != out.token_logps.shape:
                raise ValueError(f"p3o: clip_tokenwise needs batch[{key!r}] of shape "
                                 f"{out.token_logps.shape} like out.token_logps")
        tokens = (out.token_logps, batch["old_token_logps"], batch["loss_mask"])
    dt = out.logps.dtype
    return p3o_loss_from_logps(
        out.logps, batch["old_logps"].astype(dt), batch["ref_logps"].astype(dt),
        batch["rewards"].astype(dt), out.lengths, variant=variant, kl_coef=kl_coef,
        clip_eps=clip_eps, cliprange_ratio=cliprange_ratio, avg_tokenwise=avg_tokenwise,
        scale_q=scale_q, tokens=tokens)


def check_p3o(h: dict) -> None:
    v.one_of("p3o", "variant", h["variant"], VARIANTS)
    v.non_negative("p3o", "kl_coef", h["kl_coef"])
    v.positive("p3o", "clip_eps", h["clip_eps"])
    if v.number("p3o", "cliprange_ratio", h["cliprange_ratio"]) < 1:
        raise ValueError(f"loss 'p3o': hyperparameter cliprange_ratio={h['cliprange_ratio']!r} "
                         "is invalid; expected a number >= 1 (the pair weight is clipped to "
                         "[1/R, R])")
    v.flag("p3o", "avg_tokenwise", h["avg_tokenwise"])
    v.flag("p3o", "scale_q", h["scale_q"])
    v.flag("p3o", "clip_tokenwise", h["clip_tokenwise"])
    if h["clip_tokenwise"] and h["variant"] != "official":
        raise ValueError(f"loss 'p3o': hyperparameter clip_tokenwise=True is invalid with "
                         f"variant={h['variant']!r}; it is an option of variant 'official'")
