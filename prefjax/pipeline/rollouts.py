"""Rollouts: prompts -> samples -> scores -> (old, reference log-probs) -> the loss's batch.

One `fit` step is one rollout: `prepare` joins every process's prompts into global arrays
(`parallel.global_batch`), repeats them `samples_per_prompt` times on device (rows [:B] the
first sample of every prompt, [B:] the second), samples with the current policy, scores the
samples and builds the loss's batch with the record's `rollout.batch`; `update` then runs
`online.epochs` x `online.minibatches` optimizer steps on it. The rollout key is
`fold_in(state.rng, step)`, so a resumed run samples exactly what the original would have.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.eval import scoring_rows
from prefjax.lm import policy_out
from prefjax.losses import rollout_metrics
from prefjax.losses.records import Algorithm
from prefjax.parallel import batch_shardings
from prefjax.sampling import sample
from prefjax.train.state import merge_model, step_key
from prefjax.train.step import split_microbatches


class Settings(tuple):
    """A hashable record of online settings (a static jit argument)."""

    def __new__(cls, **kw):
        self = super().__new__(cls, sorted(kw.items()))
        self.__dict__.update(kw)
        return self


def settings_of(c: ConfigDict, eos_id: int) -> Settings:
    o = c.online
    return Settings(eos_id=eos_id, missing_eos_penalty=float(o.missing_eos_penalty),
                    kl_coef=float(o.kl_coef), gamma=float(o.gamma), lam=float(o.lam),
                    whiten_rewards=bool(o.whiten_rewards))


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef", "pad_id", "chunk"))
def _score_rows(graphdef, params, ref_graphdef, ref_params, ids, mask, samples, pad_id, chunk):
    """Training rows of prompts + samples, and the sampling policy's and the reference's
    PolicyOuts of them (one forward each, no gradient)."""
    rows = scoring_rows(ids, mask, samples, pad_id=pad_id)
    out = policy_out(nnx.merge(graphdef, params), rows, chunk_size=chunk)
    ref = policy_out(nnx.merge(ref_graphdef, ref_params), rows, chunk_size=chunk)
    return rows, out, ref


@functools.partial(jax.jit, static_argnames=("build", "shaped_kl", "o"))
def _assemble(rows, out, ref, samples, scores, build, shaped_kl, o):
    """The loss's batch and the rollout metrics from scored samples (one compiled program: on a
    mesh, eager ops on sharded arrays each run their own small collective program)."""
    scores = jnp.asarray(scores, jnp.float32)
    ended = jnp.any((samples.tokens == o.eos_id) & (samples.mask > 0), axis=1)
    scores = scores - o.missing_eos_penalty * (~ended)
    metrics = {**rollout_metrics(scores, out.token_logps, ref.token_logps, rows["loss_mask"],
                                 kl_coef=o.kl_coef if shaped_kl else 0.0),
               # TRL's estimate: -log pi(y|x) of the sampled responses, summed over tokens
               "objective/entropy": -jnp.mean(out.logps),
               "rollout/length": jnp.mean(samples.lengths.astype(jnp.float32)),
               "rollout/eos_fraction": jnp.mean(ended.astype(jnp.float32))}
    return build(rows, out, ref, scores, o), metrics


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _repeat(ids, mask, k, mesh):
    """Prompts [B, p] -> [k B, p]: k copies one after another, rows split over the mesh."""
    out = jnp.concatenate([ids] * k), jnp.concatenate([mask] * k)
    return tuple(jax.lax.with_sharding_constraint(x, parallel.batch_shardings({"x": x}, mesh)["x"])
                 for x in out)


def make_rollout(c: ConfigDict, rec: Algorithm, reference: nnx.Module, scorer: Callable, *,
                 pad_id: int, eos_id: int, mesh) -> Callable:
    """`prepare(state, prompts) -> {"batch": loss batch, "metrics": rollout metrics}`: sample,
    score, build; `prompts` is this process's share of the global prompt batch."""
    o, r = c.online, rec.rollout
    chunk = c.model.logps_chunk or None
    ref_graphdef, ref_params = nnx.split(reference)
    settings = settings_of(c, eos_id)

    def prepare(state, raw):
        g = parallel.global_batch(raw, mesh)
        ids, mask = g["input_ids"], g["attention_mask"]
        if r.samples_per_prompt > 1:
            ids, mask = _repeat(ids, mask, r.samples_per_prompt, mesh)
        model = merge_model(state)
        s = sample(model, ids, mask, step_key(state), max_new_tokens=o.max_new_tokens,
                   temperature=o.temperature, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
        graphdef, params = nnx.split(model)
        rows, out, ref = _score_rows(graphdef, params, ref_graphdef, ref_params, ids, mask, s,
                                     pad_id, chunk)
        scores = scorer(ids, s.tokens, rows)
        batch, metrics = _assemble(rows, out, ref, s, scores, r.batch, r.shaped_kl, settings)
        return {"batch": batch, "metrics": metrics}

    return prepare


@functools.partial(jax.jit, static_argnames=("k", "paired", "mesh"))
def _minibatches(batch, k, paired, mesh):
    """`k` minibatches of `batch`, each laid out over the mesh's batch axes, in one program."""
    mbs = split_microbatches(batch, k, paired=paired)
    parts = [{key: v[i] for key, v in mbs.items()} for i in range(k)]
    return [jax.lax.with_sharding_constraint(p, batch_shardings(p, mesh)) for p in parts]


def make_update(step, *, epochs: int, minibatches: int, paired: bool, mesh) -> Callable:
    """`(state, rollout) -> (state, metrics)`: `epochs` passes of `minibatches` updates."""
    if epochs < 1 or minibatches < 1:
        raise ValueError(f"online.epochs ({epochs}) and online.minibatches ({minibatches}) "
                         "must be >= 1")

    def update(state, rollout):
        parts = _minibatches(rollout["batch"], minibatches, paired, mesh)
        ms = []
        for _ in range(epochs):
            for p in parts:
                state, m = step(state, p)
                ms.append(m)
        # averaged on the host: a few scalars per update, no eager ops on mesh-sharded arrays
        ms = jax.device_get(ms)
        metrics = {k: np.mean([m[k] for m in ms]) for k in ms[0]}
        metrics["nonfinite"] = max(m["nonfinite"] for m in ms)  # any bad update stops the run
        return state, {**metrics, **jax.device_get(rollout["metrics"])}

    return update
