"""Bradley-Terry reward-model loss on scalar scores (Ouyang et al. 2022; Llama-2; TRL).

ALGORITHMS.md section 5: L = -log sigma(r_w - r_l [- margin]) + center_coef * mean((r_w + r_l)^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import _validate as v
from prefjax.losses._common import check_rows, log_sigmoid, num_pairs
from prefjax.typing import Array, Batch, Metrics, PolicyOut


def bt_loss(r_w: Array, r_l: Array, margin: Array | None = None, *, center_coef: float = 0.0
            ) -> Array:
    """Mean over pairs of -log sigma(r_w - r_l - margin) plus the centering penalty; all [n]."""
    z = r_w - r_l if margin is None else r_w - r_l - margin
    loss = -jnp.mean(log_sigmoid(z))
    if center_coef:
        # TRL's center_rewards_coefficient: pulls the mean reward towards 0 (Eisenstein et al. 2023)
        loss = loss + center_coef * jnp.mean(jnp.square(r_w + r_l))
    return loss


def reward_bt(out: PolicyOut, batch: Batch, *, center_coef: float = 0.0) -> tuple[Array, Metrics]:
    """Reward-model loss on `out.scores` [b] (rows [:n] chosen, [n:2n] rejected).

    If the batch carries `margin` [n] (Llama-2 RM: how much better the chosen response is), it is
    subtracted inside the sigmoid; without the key the plain Bradley-Terry loss is used.
    """
    if out.scores is None:
        raise ValueError("reward_bt: out.scores is None; the reward model's scalar head must "
                         "fill PolicyOut.scores [b]")
    n = num_pairs(out.scores.shape[0], "reward_bt")
    r_w, r_l = out.scores[:n], out.scores[n:]
    margin = None
    if "margin" in batch:
        margin = check_rows("reward_bt", "margin", batch["margin"], n).astype(r_w.dtype)
    loss = bt_loss(r_w, r_l, margin, center_coef=center_coef)
    sw, sl = jax.lax.stop_gradient(r_w), jax.lax.stop_gradient(r_l)
    return loss, {
        "loss": loss,
        "rewards/chosen": jnp.mean(sw),
        "rewards/rejected": jnp.mean(sl),
        "rewards/accuracies": jnp.mean((sw > sl).astype(sw.dtype)),
        "rewards/margins": jnp.mean(sw - sl),
    }


def check_reward_bt(h: dict) -> None:
    v.non_negative("reward_bt", "center_coef", h["center_coef"])
