"""The DPO family on sequence log-probs: DPO and TRL's loss types, IPO, cDPO, SimPO, CPO, ORPO.

ALGORITHMS.md sections 1, 2 and 6. Notation: r_w = log pi(y_w) - log ref(y_w), r_l alike,
h = r_w - r_l (sums over response tokens), h_bar from per-token averaged log-ratios.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import chosen_nll, log_sigmoid, pair_inputs, pair_metrics, safe_div
from prefjax.typing import Array, Batch, Metrics, PolicyOut

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # read label_smoothing


def _smoothed_sigmoid(z: Array, eps: float) -> Array:
    """cDPO: -(1 - eps) log sigma(z) - eps log sigma(-z) (eps = 0 is plain DPO)."""
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def dpo_loss_from_logps(pi_c: Array, pi_r: Array, ref_c: Array, ref_r: Array, len_c: Array,
                        len_r: Array, *, beta: float, loss_type: str = "sigmoid",
                        label_smoothing: float = 0.0, ipo_average: bool = True,
                        discopop_tau: float = 0.05) -> Array:
    """Scalar batch loss of one `loss_type` from policy / reference log-probs and lengths, [n] each.

    Every type is a mean over pairs except `sft` (token-mean NLL of the chosen responses); `aot`
    and `aot_unpaired` sort over all pairs given (the whole batch, also under grad_accum).
    `ipo_average` makes ipo use h_bar (TRL, default) instead of h (IPO paper, Eq. 17).
    """
    eps = label_smoothing
    r_w, r_l = pi_c - ref_c, pi_r - ref_r
    h = r_w - r_l
    h_bar = safe_div(r_w, len_c) - safe_div(r_l, len_r)
    z = beta * h
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(z, eps)
    elif loss_type == "hinge":  # SLiC
        losses = jax.nn.relu(1 - z)
    elif loss_type == "ipo":
        losses = jnp.square((h_bar if ipo_average else h) - 1 / (2 * beta))
    elif loss_type == "exo_pair":  # reverse KL from the smoothed label distribution (EXO)
        losses = (jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
                  + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))
    elif loss_type == "nca_pair":
        losses = (-log_sigmoid(beta * r_w) - 0.5 * log_sigmoid(-beta * r_w)
                  - 0.5 * log_sigmoid(-beta * r_l))
    elif loss_type == "robust":  # unbiased under label flips: note the + on the second term
        losses = (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":  # without the running reward mean of older TRL (it is state)
        losses = -log_sigmoid(beta * r_w) - log_sigmoid(-beta * r_l)
    elif loss_type == "sppo_hard":
        losses = jnp.square(r_w - 1 / (2 * beta)) + jnp.square(r_l + 1 / (2 * beta))
    elif loss_type == "aot":  # optimal transport between batch distributions: sort, then pair
        delta = jnp.sort(pi_c - pi_r) - jnp.sort(ref_c - ref_r)
        losses = _smoothed_sigmoid(beta * delta, eps)
    elif loss_type == "aot_unpaired":
        losses = _smoothed_sigmoid(beta * (jnp.sort(r_w) - jnp.sort(r_l)), eps)
    elif loss_type == "apo_zero":
        losses = (1 - jax.nn.sigmoid(beta * r_w)) + jax.nn.sigmoid(beta * r_l)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * r_w) + (1 - jax.nn.sigmoid(z))
    elif loss_type == "discopop":
        m = jax.nn.sigmoid(z / discopop_tau)
        # m underflows to exactly 0 long before exp(-z) overflows, so the cap changes nothing
        # but keeps 0 * inf out of the loss and its gradient
        losses = (1 - m) * -log_sigmoid(z) + m * jnp.exp(jnp.minimum(-z, 80.0))
    elif loss_type == "sft":
        return chosen_nll(pi_c, len_c)
    elif loss_type == "sigmoid_norm":
        losses = -log_sigmoid(beta * h_bar)
    else:
        raise ValueError(f"dpo: unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return jnp.mean(losses)


def _types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def dpo(out: PolicyOut, batch: Batch, *, beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0, reference_free: bool = False, rpo_alpha: float = 0.0,
        ipo_average: bool = True, discopop_tau: float = 0.05) -> tuple[Array, Metrics]:
    """DPO (Rafailov et al. 2023) with TRL's `loss_type`s; `batch["ref_logps"]` [b] unless
    reference_free. A list of loss types sums them, weighted by `loss_weights` (default 1 each);
    `label_smoothing` > 0 on sigmoid is cDPO; `rpo_alpha` adds alpha * NLL(y_w) (RPO)."""
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = pair_inputs(
        "dpo", out, batch, reference_free=reference_free)
    types = _types(loss_type)
    weights = (1.0,) * len(types) if loss_weights is None else tuple(loss_weights)
    metrics = {}
    loss = jnp.zeros((), pi_c.dtype)
    for t, w in zip(types, weights, strict=True):
        part = dpo_loss_from_logps(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta=beta, loss_type=t,
                                   label_smoothing=label_smoothing, ipo_average=ipo_average,
                                   discopop_tau=discopop_tau)
        if len(types) > 1:
            metrics[f"loss/{t}"] = part
        loss = loss + w * part
    if rpo_alpha:
        nll = chosen_nll(pi_c, len_c)
        metrics["nll_loss"] = nll
        loss = loss + rpo_alpha * nll
    metrics.update(pair_metrics(pi_c, pi_r, beta * (pi_c - ref_c), beta * (pi_r - ref_r)))
    metrics["loss"] = loss
    return loss, metrics


def ipo(out: PolicyOut, batch: Batch, *, beta: float = 0.1, average: bool = True,
        reference_free: bool = False) -> tuple[Array, Metrics]:
    """IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 tau))^2 with tau named `beta`; `average` uses
    per-token averaged log-ratios (TRL; the paper sums). Logged rewards stay sum-based."""
    return dpo(out, batch, beta=beta, loss_type="ipo", ipo_average=average,
               reference_free=reference_free)


def cdpo(out: PolicyOut, batch: Batch, *, beta: float = 0.1, label_smoothing: float = 0.1,
         reference_free: bool = False) -> tuple[Array, Metrics]:
    """Conservative DPO (Mitchell): labels flipped with probability eps = `label_smoothing`."""
    return dpo(out, batch, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing,
               reference_free=reference_free)


def simpo(out: PolicyOut, batch: Batch, *, beta: float = 2.0, gamma: float = 1.0,
          label_smoothing: float = 0.0, alpha: float = 0.0) -> tuple[Array, Metrics]:
    """SimPO (Meng et al. 2024): -log sigma(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma);
    no reference. Defaults follow the paper's Llama-3-Base setting (beta 2.0, gamma 1.0);
    `alpha` adds NLL(y_w) (CPO-SimPO), `label_smoothing` the cDPO form."""
    pi_c, pi_r, _, _, len_c, len_r = pair_inputs("simpo", out, batch, reference_free=True)
    avg_c, avg_r = safe_div(pi_c, len_c), safe_div(pi_r, len_r)
    loss = jnp.mean(_smoothed_sigmoid(beta * (avg_c - avg_r) - gamma, label_smoothing))
    metrics = pair_metrics(pi_c, pi_r, beta * avg_c, beta * avg_r)
    if alpha:
        metrics["nll_loss"] = nll = chosen_nll(pi_c, len_c)
        loss = loss + alpha * nll
    metrics["loss"] = loss
    return loss, metrics


def cpo(out: PolicyOut, batch: Batch, *, beta: float = 0.1, alpha: float = 1.0,
        label_smoothing: float = 0.0) -> tuple[Array, Metrics]:
    """CPO (Xu et al. 2024): -log sigma(beta (log pi(y_w) - log pi(y_l))) + alpha NLL(y_w); sums,
    no reference (TRL's CPOTrainer, `cpo_alpha` = alpha)."""
    pi_c, pi_r, _, _, len_c, _ = pair_inputs("cpo", out, batch, reference_free=True)
    pref = jnp.mean(_smoothed_sigmoid(beta * (pi_c - pi_r), label_smoothing))
    nll = chosen_nll(pi_c, len_c)
    loss = pref + alpha * nll
    metrics = pair_metrics(pi_c, pi_r, beta * pi_c, beta * pi_r)
    metrics.update({"nll_loss": nll, "loss": loss})
    return loss, metrics


def _log1mexp(a: Array) -> Array:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012)."""
    return jnp.where(a > -jnp.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo(out: PolicyOut, batch: Batch, *, beta: float = 0.1) -> tuple[Array, Metrics]:
    """ORPO (Hong et al. 2024): NLL(y_w) - lambda log sigma(log odds(y_w) - log odds(y_l)), with
    P = exp(mean token log-prob), odds = P / (1 - P) and lambda named `beta` (as TRL)."""
    pi_c, pi_r, _, _, len_c, len_r = pair_inputs("orpo", out, batch, reference_free=True)
    # a mean log-prob of exactly 0 (P = 1) has infinite odds; cap it just below 0
    avg_c = jnp.minimum(safe_div(pi_c, len_c), -1e-6)
    avg_r = jnp.minimum(safe_div(pi_r, len_r), -1e-6)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = log_sigmoid(log_odds)
    nll = chosen_nll(pi_c, len_c)
    loss = nll - beta * jnp.mean(ratio)
    metrics = pair_metrics(pi_c, pi_r, beta * avg_c, beta * avg_r)
    metrics.update({"nll_loss": nll, "log_odds_ratio": jnp.mean(jax.lax.stop_gradient(ratio)),
                    "log_odds_chosen": jnp.mean(jax.lax.stop_gradient(log_odds)), "loss": loss})
    return loss, metrics


def check_dpo(h: dict, name: str = "dpo") -> None:
    v.positive(name, "beta", h["beta"])
    v.half_open(name, "label_smoothing", h.get("label_smoothing", 0.0), 0.0, 0.5)
    v.flag(name, "reference_free", h.get("reference_free", False))
    if name != "dpo":
        return
    types = h["loss_type"]
    if isinstance(types, str) or not isinstance(types, Sequence) or not types:
        types = (types,)
    for t in types:
        v.one_of(name, "loss_type", t, LOSS_TYPES)
    if h["loss_weights"] is not None and (
            isinstance(h["loss_weights"], str) or not isinstance(h["loss_weights"], Sequence)
            or len(h["loss_weights"]) != len(types)):
        raise ValueError(f"loss 'dpo': hyperparameter loss_weights={h['loss_weights']!r} is "
                         f"invalid; expected None or {len(types)} numbers (one per loss_type "
                         f"{list(types)})")
    for w in h["loss_weights"] or ():
        v.non_negative(name, "loss_weights", w)
    eps = h["label_smoothing"]
    if eps and not set(types) & set(SMOOTHED):
        raise ValueError(f"loss 'dpo': hyperparameter label_smoothing={eps!r} has no effect with "
                         f"loss_type={h['loss_type']!r}; it is used by {', '.join(SMOOTHED)}")
    if "exo_pair" in types and eps == 0:
        raise ValueError("loss 'dpo': hyperparameter label_smoothing=0 is invalid for loss_type "
                         "exo_pair (it takes log(label_smoothing)); expected a number in (0, 0.5),"
                         " the EXO paper uses 1e-3")
    v.non_negative(name, "rpo_alpha", h["rpo_alpha"])
    v.flag(name, "ipo_average", h["ipo_average"])
    v.positive(name, "discopop_tau", h["discopop_tau"])


def check_ipo(h: dict) -> None:
    check_dpo(h, "ipo")
    v.flag("ipo", "average", h["average"])


def check_cdpo(h: dict) -> None:
    check_dpo(h, "cdpo")


def check_simpo(h: dict) -> None:
    check_dpo(h, "simpo")
    v.number("simpo", "gamma", h["gamma"])
    v.non_negative("simpo", "alpha", h["alpha"])


def check_cpo(h: dict) -> None:
    check_dpo(h, "cpo")
    v.non_negative("cpo", "alpha", h["alpha"])


def check_orpo(h: dict) -> None:
    v.positive("orpo", "beta", h["beta"])
