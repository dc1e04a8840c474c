"""Evaluation: preference accuracy on held-out pairs, and sampled reward / KL(pi || ref).

`pair_metrics` needs no sampling: it ranks each held-out pair by the policy's implicit reward
log pi / pi_ref. `sample_metrics` samples responses from the policy on held-out prompts and
scores them with a reward function (the synthetic task's ground truth r*, or a reward model),
estimating KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from the same samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.lm import policy_out
from prefjax.sampling import sample, training_rows

Array = jax.Array


def logps_fn(chunk: int | None = None):
    """Jitted `(model, batch) -> [b]` sequence log-probs over `loss_mask` (no gradient use)."""

    @nnx.jit
    def f(model, batch):
        return policy_out(model, batch, chunk_size=chunk).logps

    return f


def pair_metrics(policy: nnx.Module, reference: nnx.Module | None,
                 batches: Iterable[Mapping[str, np.ndarray]], *,
                 chunk: int | None = None) -> dict[str, float]:
    """Held-out preference accuracy of the implicit reward log pi(y|x) - log pi_ref(y|x).

    batches: `collate_pairs` batches ([:n] chosen, [n:] rejected). reference None compares raw
    policy log-probs. Ties (e.g. policy == reference) count 1/2, so an untrained policy scores
    exactly 0.5. Returns accuracy, the mean margin and the number of pairs.
    """
    f = logps_fn(chunk)
    wins, margins = [], []
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()
                 if k in ("input_ids", "attention_mask", "loss_mask")}
        r = np.asarray(f(policy, batch), np.float64)
        if reference is not None:
            r = r - np.asarray(f(reference, batch), np.float64)
        n = len(r) // 2
        m = r[:n] - r[n:]
        wins.append(np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0)))
        margins.append(m)
    wins, margins = np.concatenate(wins), np.concatenate(margins)
    return {"pair_accuracy": float(wins.mean()), "pair_margin": float(margins.mean()),
            "pairs": float(len(wins))}


@functools.partial(jax.jit, static_argnames="pad_id")
def scoring_rows(ids, mask, samples, pad_id):
    """`training_rows` of prompts [b, p] + `samples` without `sample_token_logps`: the rows a
    policy or reference scores. Jitted (eager ops on mesh-sharded samples each compile their own
    program)."""
    rows = training_rows(ids, mask, samples, pad_id=pad_id)
    return {k: rows[k] for k in ("input_ids", "attention_mask", "loss_mask")}


def sample_metrics(policy: nnx.Module, reference: nnx.Module | None,
                   prompt_batches: Iterable[Mapping[str, np.ndarray]], *, key: Array,
                   reward_fn: Callable[[Array, Array], Array], max_new_tokens: int,
                   eos_id: int, pad_id: int, temperature: float = 1.0,
                   greedy: bool = False, chunk: int | None = None) -> dict[str, float]:
    """Mean reward, KL(pi || ref) and length of responses sampled from `policy`.

    prompt_batches: `collate_prompts` batches (left-padded input_ids / attention_mask [b, p]).
    reward_fn: `(prompt_ids [b, p], response_ids [b, n]) -> [b]`, e.g.
    `prefjax.data.synthetic.reward_jnp`. The KL estimate uses temperature-1 samples (k1 estimator,
    unbiased); with `greedy` or another temperature it is reported as `logratio` instead, since it
    is then no KL of the policy.
    """
    f = logps_fn(chunk)
    rewards, ratios, lengths = [], [], []
    for i, batch in enumerate(prompt_batches):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        s = sample(policy, ids, mask, jax.random.fold_in(key, i), max_new_tokens=max_new_tokens,
                   temperature=temperature, greedy=greedy, eos_id=eos_id, pad_id=pad_id)
        rewards.append(np.asarray(reward_fn(ids, s.tokens), np.float64))
        lengths.append(np.asarray(s.lengths, np.float64))
        if reference is not None:
            rows = scoring_rows(ids, mask, s, pad_id=pad_id)
            ratios.append(np.asarray(f(policy, rows), np.float64)
                          - np.asarray(f(reference, rows), np.float64))
    out = {"reward": float(np.concatenate(rewards).mean()),
           "length": float(np.concatenate(lengths).mean())}
    if ratios:
        name = "kl" if temperature == 1.0 and not greedy else "logratio"
        out[name] = float(np.concatenate(ratios).mean())
    return out
