"""Batch keys of the GRPO / RLOO / KTO losses beyond input_ids / attention_mask / loss_mask, made
from a model's outputs (for tests that build batches generically, e.g.
tests/train/test_accumulation_exact.py): `extras(rng, out, batch) -> dict` as its BUILDERS use.

Rows of grpo / rloo batches are rollouts in sample-major order; the advantages are made by the
losses' own advantage functions from random rewards, so groups matter only through them.
"""

from __future__ import annotations

import numpy as np

from prefjax.losses.grpo import group_advantages

K_GEN = 3  # samples per prompt of the rollout rows


def _near(rng, x, scale):
    return (x + scale * rng.standard_normal(x.shape)).astype(np.float32)


def extras_grpo(rng, out, batch):
    lm = batch["loss_mask"]
    b = lm.shape[0]
    rewards = rng.standard_normal(b).astype(np.float32)
    adv, _ = group_advantages(rewards, K_GEN if b % K_GEN == 0 else 1)
    old = _near(rng, out.token_logps, 0.15) * lm
    return {"advantages": np.asarray(adv), "old_token_logps": old,
            "ref_token_logps": _near(rng, out.token_logps, 0.3) * lm,
            "sample_token_logps": _near(rng, old, 0.05) * lm}


def extras_rloo(rng, out, batch):
    lm = batch["loss_mask"]
    old = _near(rng, out.token_logps, 0.02) * lm  # sequence ratios: keep them near 1
    return {"advantages": rng.standard_normal(lm.shape[0]).astype(np.float32),
            "old_token_logps": old, "sample_token_logps": _near(rng, old, 0.01) * lm}


def extras_kto(rng, out, batch):
    n = batch["loss_mask"].shape[0] // 2
    labels = (rng.random(n) < 0.5).astype(np.float32)
    labels[0], labels[1] = 1.0, 0.0  # both kinds present
    return {"ref_logps": _near(rng, out.logps, 1.0), "labels": np.concatenate([labels, labels])}


# entries for a BUILDERS table: (paired layout, extras)
BUILDERS = {"grpo": dict(paired=False, extras=extras_grpo),
            "rloo": dict(paired=False, extras=extras_rloo),
            "kto": dict(paired=True, extras=extras_kto)}
# non-default options whose reductions differ from the defaults'
OPTIONS = [("grpo", {"loss_type": "grpo"}), ("grpo", {"loss_type": "dr_grpo"}),
           ("grpo", {"importance_sampling_level": "sequence", "beta": 0.04}),
           ("grpo", {"tis_cap": 1.02, "epsilon_high": 0.28}),
           ("rloo", {"tis_cap": 1.01})]
