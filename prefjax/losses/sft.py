"""Supervised fine-tuning: negative log-likelihood of the response tokens."""

from __future__ import annotations

import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import safe_div
from prefjax.typing import Array, Batch, Metrics, PolicyOut

REDUCTIONS = ("token_mean", "sequence_sum")


def sft_nll(token_logps: Array, loss_mask: Array, *, reduction: str = "token_mean") -> Array:
    """NLL of `token_logps` [b, t] over `loss_mask` [b, t].

    token_mean: sum of -log p over every scored token of the batch / number of such tokens.
    sequence_sum: mean over rows of each row's summed -log p (the sequence NLL).
    """
    mask = loss_mask.astype(token_logps.dtype)
    # where (not a product) so that garbage, even inf, under mask 0 cannot leak
    nll = -jnp.where(mask > 0, token_logps, 0)
    if reduction == "token_mean":
        return safe_div(jnp.sum(nll), jnp.sum(mask))
    return jnp.mean(jnp.sum(nll, axis=-1))


def sft(out: PolicyOut, batch: Batch, *, reduction: str = "token_mean") -> tuple[Array, Metrics]:
    """SFT loss. Reads `out.token_logps` [b, t] and `batch["loss_mask"]` [b, t] (not `out.logps`),
    so positions outside the loss mask never count, whatever the forward put there.

    Metrics: `loss`, `nll/per_token` (token-mean NLL), `num_tokens`.
    """
    if "loss_mask" not in batch:
        raise ValueError("sft: batch has no 'loss_mask' ([b, t], 1 on response tokens)")
    mask = batch["loss_mask"]
    if mask.shape != out.token_logps.shape:
        raise ValueError(f"sft: batch['loss_mask'] has shape {mask.shape} but out.token_logps "
                         f"has shape {out.token_logps.shape}")
    loss = sft_nll(out.token_logps, mask, reduction=reduction)
    per_token = sft_nll(out.token_logps, mask, reduction="token_mean")
    n_tok = jnp.sum(mask.astype(loss.dtype))
    return loss, {"loss": loss, "nll/per_token": per_token, "num_tokens": n_tok}


def check_sft(h: dict) -> None:
    v.one_of("sft", "reduction", h["reduction"], REDUCTIONS)
