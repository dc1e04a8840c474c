"""Evaluation: preference accuracy on held-out pairs, and sampled reward / KL(pi || ref).

`pair_metrics` needs no sampling: it ranks each held-out pair by the policy's implicit reward
log pi / pi_ref. `sample_metrics` samples responses from the policy on held-out prompts and
scores them with a reward function (the synthetic task's ground truth r*, or a reward model),
estimating KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from the same samples.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.credit import token_rewards  # noqa: F401  (public: prefjax.eval.token_rewards)
from prefjax.lm import policy_out
from prefjax.parallel import host_values
from prefjax.sampling import sample, training_rows

Array = jax.Array

# traces (= compilations) of the shared log-prob function, by vocabulary chunk: a run compiles
# it once per (model structure, batch shape), however often it evaluates
TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _logps(graphdef, state, batch, chunk):
    TRACES[chunk] += 1  # runs only while tracing
    return policy_out(nnx.merge(graphdef, state), batch, chunk_size=chunk).logps


@functools.cache
def logps_fn(chunk: int | None = None):
    """Jitted `(model, batch) -> [b]` sequence log-probs over `loss_mask` (no gradient use).

    One function per `chunk`, shared by every caller: models of the same structure (e.g. each
    evaluation's `merge_model(state)`) reuse its compiled code."""

    def f(model, batch):
        graphdef, state = nnx.split(model)
        return _logps(graphdef, state, dict(batch), chunk)

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
                   reward_fn: Callable[[Array, Array], Array] | None = None, max_new_tokens: int,
                   eos_id: int, pad_id: int, temperature: float = 1.0,
                   greedy: bool = False, chunk: int | None = None,
                   scorer: Callable[[Array, Array, dict], Array] | None = None,
                   mesh=None) -> dict[str, float]:
    """Mean reward, KL(pi || ref) and length of responses sampled from `policy`.

    prompt_batches: `collate_prompts` batches (left-padded input_ids / attention_mask [b, p]),
    host arrays or global arrays (`prefjax.parallel.global_batch`).
    reward_fn: `(prompt_ids [b, p], response_ids [b, n]) -> [b]`, e.g.
    `prefjax.data.synthetic.reward_jnp`; or scorer: `(prompt_ids, response_ids, rows) -> [b]`
    with `rows` the true training rows of prompts + samples (`scoring_rows`, built from the
    prompt mask and the sampler's mask, never from token ids). The KL estimate uses
    temperature-1 samples (k1 estimator, unbiased); with `greedy` or another temperature it is
    reported as `logratio` instead, since it is then no KL of the policy.
    mesh: sample with rows split over the mesh (parameters sharded across hosts).
    """
    if (reward_fn is None) == (scorer is None):
        raise ValueError("sample_metrics needs exactly one of reward_fn and scorer")
    f = logps_fn(chunk)
    rewards, ratios, lengths = [], [], []
    for i, batch in enumerate(prompt_batches):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        s = sample(policy, ids, mask, jax.random.fold_in(key, i), max_new_tokens=max_new_tokens,
                   temperature=temperature, greedy=greedy, eos_id=eos_id, pad_id=pad_id,
                   mesh=mesh)
        rows = scoring_rows(ids, mask, s, pad_id=pad_id)
        r = reward_fn(ids, s.tokens) if scorer is None else scorer(ids, s.tokens, rows)
        rewards.append(host_values(r).astype(np.float64))
        lengths.append(host_values(s.lengths).astype(np.float64))
        if reference is not None:
            ratios.append(host_values(f(policy, rows)).astype(np.float64)
                          - host_values(f(reference, rows)).astype(np.float64))
    out = {"reward": float(np.concatenate(rewards).mean()),
           "length": float(np.concatenate(lengths).mean())}
    if ratios:
        name = "kl" if temperature == 1.0 and not greedy else "logratio"
        out[name] = float(np.concatenate(ratios).mean())
    return out
