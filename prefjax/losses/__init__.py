"""Loss registry: `get(name, **hparams)` validates hyperparameters and binds them to a pure loss."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

# re-exported functions shadow their same-named modules (prefjax.losses.dpo is the function);
# import submodules' helpers with `from prefjax.losses.dpo import ...`
from prefjax.losses.dpo import (
    cdpo,
    check_cdpo,
    check_cpo,
    check_dpo,
    check_ipo,
    check_orpo,
    check_simpo,
    cpo,
    dpo,
    dpo_loss_from_logps,
    ipo,
    orpo,
    simpo,
)
from prefjax.losses.grpo import check_grpo, group_advantages, grpo
from prefjax.losses.kto import check_kto, kto, kto_loss_from_logps
from prefjax.losses.mpo import check_mpo, mpo, mpo_terms, pair_kl
from prefjax.losses.p3o import check_p3o, p3o, p3o_loss_from_logps
from prefjax.losses.ppo import ESTIMATORS as KL_ESTIMATORS
from prefjax.losses.ppo import (
    adaptive_kl_coef,
    check_ppo,
    gae,
    kl_penalty,
    kl_shaped_rewards,
    ppo,
    rollout_metrics,
    whiten,
)
from prefjax.losses.reward import bt_loss, check_reward_bt, reward_bt
from prefjax.losses.rloo import (
    check_rloo,
    kl_shaped_returns,
    reinforce_pp_advantages,
    rloo,
    rloo_advantages,
)
from prefjax.losses.sft import check_sft, sft, sft_nll
from prefjax.typing import LossFn

# name -> (loss, check): check(hparams with defaults filled) raises ValueError naming the field
_REGISTRY: dict[str, tuple[Callable, Callable[[dict], None]]] = {
    "sft": (sft, check_sft),
    "reward_bt": (reward_bt, check_reward_bt),
    "dpo": (dpo, check_dpo),
    "ipo": (ipo, check_ipo),
    "cdpo": (cdpo, check_cdpo),
    "simpo": (simpo, check_simpo),
    "cpo": (cpo, check_cpo),
    "orpo": (orpo, check_orpo),
    "mpo": (mpo, check_mpo),
    "ppo": (ppo, check_ppo),
    "p3o": (p3o, check_p3o),
    "grpo": (grpo, check_grpo),
    "rloo": (rloo, check_rloo),
    "kto": (kto, check_kto),
}


def names() -> list[str]:
    """The registered loss names, sorted."""
    return sorted(_REGISTRY)


def defaults(name: str) -> dict:
    """The hyperparameters of loss `name` with their default values."""
    fn, _ = _lookup(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def hyperparameter_types(name: str) -> dict[str, type]:
    """A config field type per hyperparameter of loss `name`: sequences (`Sequence[float]`,
    `tuple`) map to tuple, else the annotation's first scalar type (str, int, float, bool)."""
    fn, _ = _lookup(name)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        ann = str(p.annotation)
        if ann.startswith(("Sequence", "tuple", "list")):
            out[p.name] = tuple
        else:
            first = ann.split("|")[0].strip()
            out[p.name] = {"str": str, "int": int, "float": float, "bool": bool}.get(
                first, type(p.default) if p.default is not None else object)
    return out


def _lookup(name: str) -> tuple[Callable, Callable[[dict], None]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str, **hparams) -> LossFn:
    """`loss(out, batch) -> (loss, metrics)` with `hparams` bound, checked now (not at step 1).

    Raises ValueError for an unknown name, an unknown hyperparameter or a bad value, naming it.
    """
    fn, check = _lookup(name)
    known = defaults(name)
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"loss {name!r} has no hyperparameter(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(known))}")
    full = {**known, **hparams}
    lt = full.get("loss_type")
    if isinstance(lt, list) or (isinstance(lt, str) and "," in lt):  # TRL-style list of types
        full["loss_type"] = tuple(t.strip() for t in (lt.split(",") if isinstance(lt, str) else lt))
    if isinstance(full.get("loss_weights"), list):
        full["loss_weights"] = tuple(full["loss_weights"])
    check(full)
    return functools.partial(fn, **full)


__all__ = [
    "bt_loss", "cdpo", "cpo", "defaults", "dpo", "dpo_loss_from_logps", "gae", "get",
    "hyperparameter_types", "ipo", "kl_penalty", "kl_shaped_rewards", "mpo", "mpo_terms",
    "names", "orpo", "p3o", "p3o_loss_from_logps", "pair_kl", "ppo", "reward_bt",
    "rollout_metrics", "sft", "sft_nll", "simpo", "whiten",
    "group_advantages", "grpo", "kl_shaped_returns", "kto", "kto_loss_from_logps",
    "reinforce_pp_advantages", "rloo", "rloo_advantages", "KL_ESTIMATORS", "adaptive_kl_coef",
]
