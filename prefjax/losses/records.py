"""Algorithm records: what the pipeline needs beyond each loss (data, reference, rows, rollouts).

A record names a registered loss and declares, once, everything the one pipeline
(`prefjax.pipeline`) reads to train it from a config: the data kind, which reference quantities
it needs for given hyperparameters, an extra row group appended to each batch (MPO's
reference-policy samples), a model head, and for online algorithms how scored rollouts become
the loss's batch. Nothing outside `prefjax/losses/` names an algorithm; `config.algo` is looked
up here. Adding an algorithm = one loss file + one record in `RECORDS` + one config
(docs/adding_an_algorithm.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from prefjax.losses.grpo import grpo_batch
from prefjax.losses.ppo import gae, kl_shaped_rewards, whiten
from prefjax.losses.rloo import reinforce_pp_batch, rloo_batch

DATA_KINDS = ("pairs", "sequences", "prompts", "unpaired")
HEADS = (None, "reward", "value")


@dataclasses.dataclass(frozen=True)
class ExtraRows:
    """A row group after the main rows of every batch, flagged by `mask_key` [m] (1 = real row).

    section: the config section with `ref_samples` (where the rows come from: generate |
        synthetic | a completion-format file), `num_ref_samples` and `samples_per_batch`.
    needed: `hparams -> bool`, whether this run uses the group (e.g. its loss weight > 0).
    """

    mask_key: str
    section: str
    needed: Callable[[Mapping[str, Any]], bool]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """How an online algorithm turns scored samples into its loss's batch.

    samples_per_prompt: 1, or 2 (rows [:B] the first sample of each prompt, [B:] the second),
        or None: `online.num_generations` = k samples (row i*B + j is sample i of prompt j).
    batch: `(rows, out, ref, scores, settings) -> loss batch`, traced inside one jit: rows are
        the training rows of prompts + samples (input_ids, attention_mask, loss_mask [r, t]),
        out / ref the sampling policy's and the reference's PolicyOuts of them, scores [r] and
        settings the online config as a record (kl_coef, kl_estimator, gamma, lam,
        whiten_rewards); its kl_coef is a traced scalar (the adaptive KL controller moves it).
    shaped_kl: the rollout metrics' reward includes `online.kl_coef` x KL (PPO's shaped
        reward); only such algorithms may use the adaptive KL controller (`online.kl_target`).
    """

    samples_per_prompt: int | None
    batch: Callable
    shaped_kl: bool = False


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Everything the pipeline needs to know about `config.algo = name`.

    loss: the `prefjax.losses` name trained (several records may share a loss).
    data: pairs (chosen rows, then rejected rows) | sequences | prompts (online: rollouts) |
        unpaired (labelled prompt + completion rows, then the same prompts with mismatched
        completions; batch key labels [2n]; prefjax.data.unpaired).
    reference: `hparams -> tuple of reference quantities` the loss reads from the batch
        (() or ("logps",): the sequence log-probs `ref_logps`).
    head: None | "reward" (a scalar head on the decoder) | "value" (a value head for the policy).
    extra_rows: an extra row group (see ExtraRows), or None.
    rollout: online algorithms only (see Rollout).
    sampled_eval: whether `eval.sample` means something (a policy trained against a reference).
    """

    name: str
    loss: str
    data: str
    reference: Callable[[Mapping[str, Any]], tuple[str, ...]] = lambda hp: ()
    head: str | None = None
    extra_rows: ExtraRows | None = None
    rollout: Rollout | None = None
    sampled_eval: bool = True

    def __post_init__(self):
        if self.data not in DATA_KINDS:
            raise ValueError(f"record {self.name!r}: data must be one of {DATA_KINDS}, "
                             f"got {self.data!r}")
        if self.head not in HEADS:
            raise ValueError(f"record {self.name!r}: head must be one of {HEADS}")
        if (self.rollout is None) == (self.data == "prompts"):
            raise ValueError(f"record {self.name!r}: prompts data and a rollout go together")

    @property
    def online(self) -> bool:
        return self.rollout is not None

    @property
    def paired(self) -> bool:
        """Rows come in two halves of partners (chosen / rejected, or two samples per prompt)."""
        return self.data in ("pairs", "unpaired") or (
            self.online and self.rollout.samples_per_prompt == 2)

    def needs_reference(self, hp: Mapping[str, Any]) -> bool:
        """Whether the loss with hyperparameters `hp` reads reference log-probs from the batch."""
        return bool(self.reference(hp))

    def tail_key(self, hp: Mapping[str, Any]) -> str | None:
        """The batch key flagging the extra row group when this run uses it, else None."""
        return self.extra_rows.mask_key if self.extra_rows and self.extra_rows.needed(hp) else None


def _unless_reference_free(hp):
    return () if hp.get("reference_free", False) else ("logps",)


def _mpo_reference(hp):
    return ("logps",) if hp.get("beta", 0) and not hp.get("p_ref_uniform", False) else ()


def ppo_batch(rows, out, ref, scores, o):
    """KL-shaped per-token rewards, GAE and whitened advantages (PPO)."""
    r = kl_shaped_rewards(scores, out.token_logps, ref.token_logps, rows["loss_mask"],
                          kl_coef=o.kl_coef, estimator=o.kl_estimator)
    if o.whiten_rewards:
        r = whiten(r, rows["loss_mask"], shift_mean=False)
    adv, ret = gae(r, out.values, rows["loss_mask"], gamma=o.gamma, lam=o.lam)
    return {**rows, "old_token_logps": out.token_logps, "old_values": out.values,
            "advantages": whiten(adv, rows["loss_mask"]), "returns": ret}


def p3o_batch(rows, out, ref, scores, o):
    """Both samples of each prompt with their old and reference log-probs and scores (P3O)."""
    del o
    return {**rows, "old_logps": out.logps, "ref_logps": ref.logps, "rewards": scores,
            "old_token_logps": out.token_logps}


def ranked_pair_batch(rows, out, ref, scores, o):
    """Each prompt's two samples ordered chosen (higher score), then rejected; ties keep the
    first sample first (online DPO)."""
    del out, o
    n = scores.shape[0] // 2
    swap = scores[n:] > scores[:n]
    idx = jnp.arange(2 * n)
    order = jnp.concatenate([jnp.where(swap, idx[n:], idx[:n]), jnp.where(swap, idx[:n], idx[n:])])
    take = lambda x: jnp.take(x, order, axis=0)  # noqa: E731
    return {**{k: take(v) for k, v in rows.items()}, "ref_logps": take(ref.logps),
            "rewards": take(scores)}


_PAIRS_WITH_REF = dict(data="pairs", reference=_unless_reference_free)

RECORDS: dict[str, Algorithm] = {
    "sft": Algorithm("sft", "sft", "sequences", sampled_eval=False),
    "reward_bt": Algorithm("reward_bt", "reward_bt", "pairs", head="reward",
                           sampled_eval=False),
    "dpo": Algorithm("dpo", "dpo", **_PAIRS_WITH_REF),
    "ipo": Algorithm("ipo", "ipo", **_PAIRS_WITH_REF),
    "cdpo": Algorithm("cdpo", "cdpo", **_PAIRS_WITH_REF),
    "simpo": Algorithm("simpo", "simpo", "pairs"),
    "cpo": Algorithm("cpo", "cpo", "pairs"),
    "orpo": Algorithm("orpo", "orpo", "pairs"),
    "mpo": Algorithm("mpo", "mpo", "pairs", reference=_mpo_reference,
                     extra_rows=ExtraRows("ref_sample_mask", "mpo",
                                          needed=lambda hp: bool(hp.get("alpha", 0)))),
    "ppo": Algorithm("ppo", "ppo", "prompts", head="value",
                     rollout=Rollout(1, ppo_batch, shaped_kl=True)),
    "p3o": Algorithm("p3o", "p3o", "prompts", rollout=Rollout(2, p3o_batch)),
    "online_dpo": Algorithm("online_dpo", "dpo", "prompts", rollout=Rollout(2, ranked_pair_batch)),
    "grpo": Algorithm("grpo", "grpo", "prompts", rollout=Rollout(None, grpo_batch)),
    "rloo": Algorithm("rloo", "rloo", "prompts", rollout=Rollout(None, rloo_batch, shaped_kl=True)),
    "reinforce_pp": Algorithm("reinforce_pp", "rloo", "prompts",
                              rollout=Rollout(None, reinforce_pp_batch, shaped_kl=True)),
    "kto": Algorithm("kto", "kto", "unpaired", reference=lambda hp: ("logps",)),
}


def names() -> list[str]:
    """The algorithms a config may name, sorted."""
    return sorted(RECORDS)


def get(name: str) -> Algorithm:
    """The record of `config.algo = name`; fails naming the valid algorithms."""
    if name not in RECORDS:
        raise ValueError(f"unknown algo {name!r}; valid: {', '.join(names())} (a loss without a "
                         "record cannot run from a config: see docs/adding_an_algorithm.md)")
    return RECORDS[name]
