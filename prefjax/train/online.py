"""Online training entry point (kept for existing callers): `train(config, workdir)`.

Online algorithms run through the one pipeline, `prefjax.pipeline` (rollouts in
`prefjax.pipeline.rollouts`, each algorithm's rollout-to-batch function in its record,
`prefjax.losses.records`); this module re-exports those pieces under their old names. The
name lists `LOSS_OF` and `PAIRED` are deprecated: read the records instead.

Samples drawn at `online.temperature` T are scored at T (log-probs from logits / T) for the
policy, the old policy and the reference, as TRL's PPO does; `online.logps_at_temperature=False`
scores them at T = 1 (see `prefjax.pipeline.rollouts`).
"""

from __future__ import annotations

import warnings

from ml_collections import ConfigDict

from prefjax.pipeline import run as _run
from prefjax.pipeline.rewards import eval_reward_fn, reward_function
from prefjax.pipeline.rollouts import make_update

__all__ = ["eval_reward_fn", "make_update", "reward_function", "train"]


def train(c: ConfigDict, workdir: str) -> dict:
    """Run (or resume) the online experiment `c` in `workdir`; returns the last eval metrics."""
    from prefjax.losses import records

    rec = records.get(c.algo)
    if not rec.online:
        online = [n for n, r in records.RECORDS.items() if r.online]
        raise ValueError(f"online algo must be one of {online}, got {c.algo!r}")
    return _run.train(c, workdir)


def __getattr__(name: str):
    from prefjax.losses import records

    if name == "LOSS_OF":
        value = {n: r.loss for n, r in records.RECORDS.items() if r.online}
    elif name == "PAIRED":
        value = tuple(n for n, r in records.RECORDS.items() if r.online and r.paired)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"prefjax.train.online.{name} is deprecated; read the algorithm records "
                  "(prefjax.losses.records)", DeprecationWarning, stacklevel=2)
    return value
