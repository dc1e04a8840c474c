"""MPO, Maximum Preference Optimization (Jiang, Huang, Wei 2023, arXiv 2312.16430, Eq. 33).

ALGORITHMS.md section 3 ([reconstructed]): L = L_pref + beta * L_pairKL + alpha * L_refKL with
  L_pref   = -mean sigma(Delta),  Delta = log pi(y_w) - log pi(y_l), p_theta = sigma(Delta)
  L_pairKL = mean KL(p_theta || p_ref)  (or KL(p_ref || p_theta)), p_ref = sigma(Delta_ref)
  L_refKL  = NLL of reference-policy samples (forward KL(pi_ref || pi) up to a constant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import check_rows, log_sigmoid, safe_div
from prefjax.typing import Array, Batch, Metrics, PolicyOut

DIRECTIONS = ("policy_ref", "ref_policy")


def binary_kl(log_p: Array, log_1mp: Array, log_q: Array, log_1mq: Array) -> Array:
    """KL(Bern(p) || Bern(q)) from the four log-probabilities (stable for p, q near 0 or 1)."""
    return jnp.exp(log_p) * (log_p - log_q) + jnp.exp(log_1mp) * (log_1mp - log_1mq)


def pair_kl(delta: Array, delta_ref: Array | None, *, direction: str = "policy_ref") -> Array:
    """Per-pair binary KL between p_theta = sigma(delta) and p_ref = sigma(delta_ref) ([n] each);
    delta_ref=None means p_ref = 1/2."""
    lp, l1p = log_sigmoid(delta), log_sigmoid(-delta)
    if delta_ref is None:
        lq = l1q = jnp.full_like(delta, jnp.log(0.5))
    else:
        lq, l1q = log_sigmoid(delta_ref), log_sigmoid(-delta_ref)
    if direction == "policy_ref":
        return binary_kl(lp, l1p, lq, l1q)
    return binary_kl(lq, l1q, lp, l1p)  # soft-label cross-entropy minus the label entropy


def mpo_terms(pi_c: Array, pi_r: Array, ref_c: Array | None, ref_r: Array | None,
              ref_sample_logps: Array, ref_sample_lengths: Array, ref_sample_mask: Array, *,
              pair_kl_direction: str = "policy_ref", ref_nll_average: bool = True
              ) -> dict[str, Array]:
    """The three MPO terms (scalars) and the ref-sample NLL per token.

    pi_c, pi_r [n]: policy log-probs of the pair; ref_c, ref_r [n] their reference log-probs, or
    None for p_ref = 1/2. ref_sample_logps, ref_sample_lengths, ref_sample_mask [m]: policy
    log-probs, token counts and real-row flags of the reference-policy samples.
    ref_nll_average: token-mean NLL over all real reference tokens (default) or mean over real
    samples of the sequence NLL.
    """
    delta = pi_c - pi_r
    delta_ref = None if ref_c is None else jax.lax.stop_gradient(ref_c - ref_r)
    mask = ref_sample_mask.astype(pi_c.dtype)
    # where, not a product: padded rows may hold anything, even inf
    nll_sum = -jnp.sum(jnp.where(mask > 0, ref_sample_logps, 0))
    n_tok = jnp.sum(jnp.where(mask > 0, ref_sample_lengths, 0))
    per_token = safe_div(nll_sum, n_tok)
    return {
        "loss/pref": -jnp.mean(jax.nn.sigmoid(delta)),
        "loss/pair_kl": jnp.mean(pair_kl(delta, delta_ref, direction=pair_kl_direction)),
        "loss/ref_nll": per_token if ref_nll_average else safe_div(nll_sum, jnp.sum(mask)),
        "mpo/ref_nll_per_token": per_token,
    }


def mpo(out: PolicyOut, batch: Batch, *, beta: float = 0.1, alpha: float = 0.1,
        pair_kl_direction: str = "policy_ref", p_ref_uniform: bool = False,
        ref_nll_average: bool = True) -> tuple[Array, Metrics]:
    """MPO loss. Rows [:n] chosen, [n:2n] rejected, then m = batch["ref_sample_mask"].shape[0]
    reference-policy samples (`ref_sample_mask` [m], 1 = real row); n = (b - m) // 2.

    `batch["ref_logps"]` is [b] like every other batch key (so micro-batch splitting works); only
    its first 2n entries (the pair rows) are read, unless p_ref_uniform; it is required when
    beta > 0. Without it, the logged `loss/pair_kl` is measured against p_ref = 1/2.
    Without `ref_sample_mask` there are no reference samples (m = 0), which needs alpha = 0.
    beta and alpha may be 0 (no default values are known; beta 0.1 and alpha 0.1 are guesses).
    """
    b = out.logps.shape[0]
    m = batch["ref_sample_mask"].shape[0] if "ref_sample_mask" in batch else 0
    if m == 0 and alpha:
        raise ValueError(f"mpo: alpha={alpha} needs reference-policy samples: the batch has no "
                         "'ref_sample_mask' [m] marking its last m rows as reference samples")
    if (b - m) % 2 or b - m <= 0:
        raise ValueError(f"mpo: {b} rows minus {m} reference-sample rows must be an even, "
                         "positive number of pair rows (chosen [:n], rejected [n:2n])")
    n = (b - m) // 2
    pi_c, pi_r = out.logps[:n], out.logps[n:2 * n]
    ref_c = ref_r = None
    if beta and not p_ref_uniform and "ref_logps" not in batch:
        raise ValueError(f"mpo: beta={beta} needs p_ref from batch['ref_logps'] ([b], the "
                         "first 2n used); precompute them, or set p_ref_uniform=True "
                         "(p_ref = 1/2), or beta=0")
    if not p_ref_uniform and "ref_logps" in batch:
        ref = jax.lax.stop_gradient(check_rows("mpo", "ref_logps", batch["ref_logps"], b))
        ref_c, ref_r = ref[:n].astype(pi_c.dtype), ref[n:2 * n].astype(pi_c.dtype)
    if m:
        mask = batch["ref_sample_mask"]
        ref_lp, ref_len = out.logps[2 * n:], out.lengths[2 * n:].astype(pi_c.dtype)
    else:
        mask = ref_lp = ref_len = jnp.zeros((0,), pi_c.dtype)
    terms = mpo_terms(pi_c, pi_r, ref_c, ref_r, ref_lp, ref_len, mask,
                      pair_kl_direction=pair_kl_direction, ref_nll_average=ref_nll_average)
    loss = terms["loss/pref"]
    if beta:
        loss = loss + beta * terms["loss/pair_kl"]
    if alpha:
        loss = loss + alpha * terms["loss/ref_nll"]
    sd = jax.lax.stop_gradient
    delta = sd(pi_c - pi_r)
    metrics = {k: sd(t) for k, t in terms.items()}
    metrics.update({
        "mpo/pref_prob": jnp.mean(jax.nn.sigmoid(delta)),
        "rewards/accuracies": jnp.mean((delta > 0).astype(delta.dtype)),
        "logps/chosen": jnp.mean(sd(pi_c)),
        "logps/rejected": jnp.mean(sd(pi_r)),
        "loss": loss,
    })
    return loss, metrics


def check_mpo(h: dict) -> None:
    v.non_negative("mpo", "beta", h["beta"])
    v.non_negative("mpo", "alpha", h["alpha"])
    v.one_of("mpo", "pair_kl_direction", h["pair_kl_direction"], DIRECTIONS)
    v.flag("mpo", "p_ref_uniform", h["p_ref_uniform"])
    v.flag("mpo", "ref_nll_average", h["ref_nll_average"])
