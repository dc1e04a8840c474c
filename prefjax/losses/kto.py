"""KTO, Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), on unpaired
data, as TRL's KTOTrainer (loss_type "kto").

Batch layout (data kind "unpaired", prefjax.data.unpaired): rows [:n] are prompt + completion
with `labels[:n]` (1 desirable, 0 undesirable); rows [n:2n] are the same prompts with a
mismatched completion (another row's), which only estimate the KL reference point
z = max(0, mean_i (log pi - log ref)(mismatched row i)), detached. With r = log pi(y|x) -
log ref(y|x) of the labelled rows:

  desirable:   desirable_weight   * (1 - sigma(beta (r - z)))
  undesirable: undesirable_weight * (1 - sigma(beta (z - r)))

averaged over the n labelled rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import check_rows, num_pairs, reference_logps, safe_div
from prefjax.typing import Array, Batch, Metrics, PolicyOut


def kto_loss_from_logps(pi: Array, ref: Array, labels: Array, *, beta: float = 0.1,
                        desirable_weight: float = 1.0, undesirable_weight: float = 1.0
                        ) -> tuple[Array, Metrics]:
    """KTO loss from sequence log-probs [2n] of policy and reference (labelled rows first, then
    the mismatched KL rows) and labels [n] (1 desirable)."""
    sd = jax.lax.stop_gradient
    n = pi.shape[0] // 2
    ref = sd(ref)
    r = pi[:n] - ref[:n]
    z = sd(jnp.maximum(jnp.mean(pi[n:] - ref[n:]), 0.0))
    good = labels > 0.5
    g = good.astype(pi.dtype)
    losses = jnp.where(good, desirable_weight * (1 - jax.nn.sigmoid(beta * (r - z))),
                       undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - r))))
    loss = jnp.mean(losses)
    rw = sd(beta * r)
    n_good, n_bad = jnp.sum(g), jnp.sum(1 - g)
    mean_good = lambda x: safe_div(jnp.sum(x * g), n_good)  # noqa: E731
    mean_bad = lambda x: safe_div(jnp.sum(x * (1 - g)), n_bad)  # noqa: E731
    pi_sd = sd(pi[:n])
    return loss, {"loss": loss, "kl": z, "rewards/chosen": mean_good(rw),
                  "rewards/rejected": mean_bad(rw),
                  "rewards/margins": mean_good(rw) - mean_bad(rw),
                  "logps/chosen": mean_good(pi_sd), "logps/rejected": mean_bad(pi_sd),
                  "count/chosen": n_good, "count/rejected": n_bad}


def kto(out: PolicyOut, batch: Batch, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> tuple[Array, Metrics]:
    """KTO (defaults: TRL 1.16's KTOConfig). Batch: ref_logps [2n], labels [2n] (the first n
    read); rows as the module docstring."""
    b = out.logps.shape[0]
    n = num_pairs(b, "kto")
    if "labels" not in batch:
        raise ValueError("kto: batch has no 'labels' ([2n], 1 = desirable); use data kind "
                         "'unpaired' (prompt, completion, label)")
    labels = check_rows("kto", "labels", batch["labels"], b)[:n]
    ref = reference_logps("kto", batch, b, reference_free=False).astype(out.logps.dtype)
    return kto_loss_from_logps(out.logps, ref, labels, beta=beta,
                               desirable_weight=desirable_weight,
                               undesirable_weight=undesirable_weight)


def check_kto(h: dict) -> None:
    v.positive("kto", "beta", h["beta"])
    v.non_negative("kto", "desirable_weight", h["desirable_weight"])
    v.non_negative("kto", "undesirable_weight", h["undesirable_weight"])
