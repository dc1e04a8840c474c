"""Rollouts: prompts -> samples -> scores -> (old, reference log-probs) -> the loss's batch.

One `fit` step is one rollout: `prepare` joins every process's prompts into global arrays
(`parallel.global_batch`), repeats them `samples_per_prompt` times on device (rows [:B] the
first sample of every prompt, [B:] the second), samples with the current policy, scores the
samples and builds the loss's batch with the record's `rollout.batch`; `update` then runs
`online.epochs` x `online.minibatches` optimizer steps on it, each epoch over a fresh
permutation of the rows (pairs kept together). The rollout key is `fold_in(state.rng, step)`
and the permutations derive from it, so a resumed run samples and shuffles exactly what the
original would have.

Temperature: samples drawn at `online.temperature` T are scored at T (log-probs of
softmax(logits / T)) for the policy in the loss, the old (sampling) policy and the reference, as
TRL's PPO does; `online.logps_at_temperature=False` scores all three at T = 1 instead (TRL's
online DPO). Either way the three agree, so ratios and KL penalties compare like with like.

KL: `online.kl_coef` is the one coefficient of every online algorithm; with `online.kl_target`
> 0 (PPO) an adaptive controller (Ziegler et al. 2019) moves it after each rollout. Its current
value is a `KLCoef` variable of the trained module (in `state.rest`), so it is checkpointed and
a resumed run continues from it.
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
from prefjax.lm import policy_out, policy_out_and_entropy
from prefjax.losses import KL_ESTIMATORS, adaptive_kl_coef, rollout_metrics
from prefjax.losses.records import Algorithm
from prefjax.parallel import batch_shardings
from prefjax.sampling import sample, training_rows
from prefjax.train.state import merge_model, step_key
from prefjax.train.step import split_microbatches


class Settings(tuple):
    """A hashable record of online settings (a static jit argument)."""

    def __new__(cls, **kw):
        self = super().__new__(cls, sorted(kw.items()))
        self.__dict__.update(kw)
        return self


def settings_of(c: ConfigDict, eos_id: int | tuple[int, ...]) -> Settings:
    o = c.online
    return Settings(eos_id=eos_id, missing_eos_penalty=float(o.missing_eos_penalty),
                    kl_coef=float(o.kl_coef), gamma=float(o.gamma), lam=float(o.lam),
                    whiten_rewards=bool(o.whiten_rewards), kl_estimator=str(o.kl_estimator),
                    kl_target=float(o.kl_target), kl_horizon=float(o.kl_horizon),
                    # group algorithms (records with samples_per_prompt None)
                    num_generations=int(o.num_generations), scale_rewards=str(o.scale_rewards),
                    dynamic_sampling=bool(o.dynamic_sampling), kl_level=str(o.kl_level),
                    normalize_advantages=bool(o.normalize_advantages))


class KLCoef(nnx.Variable):
    """The adaptive KL coefficient (a float32 scalar), carried in the trained module's state."""


KL_CTL = "kl_ctl"  # the trained module's attribute holding the KLCoef
VALUE_MODELS = ("shared", "reward")


def scoring_temperature(c: ConfigDict) -> float:
    """The temperature every online log-prob is computed at: `online.temperature`, or 1 with
    `online.logps_at_temperature=False`."""
    return float(c.online.temperature) if c.online.logps_at_temperature else 1.0


def adaptive_kl(c: ConfigDict) -> bool:
    """Whether the run uses the adaptive KL controller (`online.kl_target` > 0)."""
    return float(c.online.kl_target) > 0


def check_online(c: ConfigDict, rec: Algorithm) -> None:
    """Fail at start, naming the field, for online settings this algorithm cannot honour."""
    o = c.online
    if not float(o.temperature) > 0:
        raise ValueError(f"online.temperature must be > 0, got {o.temperature!r}")
    if o.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"online.kl_estimator must be one of {' | '.join(KL_ESTIMATORS)}, got "
                         f"{o.kl_estimator!r}")
    if float(o.kl_coef) < 0:
        raise ValueError(f"online.kl_coef must be >= 0, got {o.kl_coef!r}")
    if float(o.kl_target) < 0 or not float(o.kl_horizon) > 0:
        raise ValueError(f"online.kl_target must be >= 0 (0 = fixed kl_coef) and "
                         f"online.kl_horizon > 0, got {o.kl_target!r}, {o.kl_horizon!r}")
    if adaptive_kl(c) and not rec.rollout.shaped_kl:
        raise ValueError(f"online.kl_target={o.kl_target} (adaptive KL controller) acts on the "
                         f"KL-shaped reward of PPO-like algorithms; algo {rec.name!r} has none: "
                         "set online.kl_target=0")
    if o.value_model not in VALUE_MODELS:
        raise ValueError(f"online.value_model must be one of {' | '.join(VALUE_MODELS)}, got "
                         f"{o.value_model!r}")
    if o.value_model != "shared" and rec.head != "value":
        raise ValueError(f"online.value_model={o.value_model!r} configures a value model; algo "
                         f"{rec.name!r} has none: leave it 'shared'")
    if o.value_model == "reward" and o.reward == "oracle":
        raise ValueError("online.value_model='reward' initialises the value model from the "
                         "reward model, but online.reward='oracle' has none: set online.reward "
                         "to a reward-model folder or online.value_model='shared'")
    if not 0 < float(o.top_p) <= 1:
        raise ValueError(f"online.top_p must be in (0, 1] (1: off), got {o.top_p!r}")
    for field, low in (("top_k", 0), ("cache_rows", 0), ("prefill_buckets", 1)):
        if isinstance(o[field], bool) or not isinstance(o[field], int) or o[field] < low:
            raise ValueError(f"online.{field} must be an int >= {low}, got {o[field]!r}")
    # group settings (records whose samples_per_prompt is None read them)
    if isinstance(o.num_generations, bool) or int(o.num_generations) < 1:
        raise ValueError(f"online.num_generations must be an int >= 1, got {o.num_generations!r}")
    for field, options in (("scale_rewards", ("group", "batch", "none")),
                           ("kl_level", ("sequence", "token"))):
        if o[field] not in options:
            raise ValueError(f"online.{field} must be one of {' | '.join(options)}, got "
                             f"{o[field]!r}")


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef", "pad_id", "chunk",
                                             "temperature"))
def _score_rows(graphdef, params, ref_graphdef, ref_params, ids, mask, samples, pad_id, chunk,
                temperature=1.0):
    """Training rows of prompts + samples (with the sampler's `sample_token_logps`, for the
    trainer/sampler mismatch and TIS), and the sampling policy's and the reference's
    PolicyOuts of them at `temperature`, and the policy's per-token entropy [r, t] at it (one
    forward each, no gradient)."""
    rows = training_rows(ids, mask, samples, pad_id=pad_id)
    out, ent = policy_out_and_entropy(nnx.merge(graphdef, params), rows, chunk_size=chunk,
                                      temperature=temperature)
    ref = policy_out(nnx.merge(ref_graphdef, ref_params), rows, chunk_size=chunk,
                     temperature=temperature)
    return rows, out, ref, ent


@functools.partial(jax.jit, static_argnames=("build", "shaped_kl", "o"))
def _assemble(rows, out, ref, ent, samples, scores, kl_coef, build, shaped_kl, o):
    """The loss's batch, the rollout metrics and the next KL coefficient from scored samples
    (one compiled program: on a mesh, eager ops on sharded arrays each run their own small
    collective program). `kl_coef` is traced, so the adaptive controller never recompiles;
    the record's builder reads it as `o.kl_coef`."""
    scores = jnp.asarray(scores, jnp.float32)
    kl_coef = jnp.asarray(kl_coef, jnp.float32)
    o = Settings(**{**o.__dict__, "kl_coef": kl_coef})
    n_tok = jnp.maximum(jnp.sum(rows["loss_mask"]), 1)
    # o.eos_id: one id or a tuple of them (any ends a response; `prefjax.train.build.eos_ids`)
    ended = jnp.any(jnp.isin(samples.tokens, jnp.asarray(o.eos_id)) & (samples.mask > 0), axis=1)
    scores = scores - o.missing_eos_penalty * (~ended)
    metrics = {**rollout_metrics(scores, out.token_logps, ref.token_logps, rows["loss_mask"],
                                 kl_coef=kl_coef if shaped_kl else 0.0,
                                 estimator=o.kl_estimator),
               # the true entropy of the scored policy's next-token distributions along the
               # samples, summed over response tokens (TRL logs -log pi(y|x) under this name:
               # that estimate is objective/neg_logp)
               "objective/entropy": jnp.mean(jnp.sum(ent, axis=-1)),
               "objective/neg_logp": -jnp.mean(out.logps),
               "objective/kl_coef": kl_coef,
               "rollout/entropy_token_avg": jnp.sum(ent) / n_tok,
               "rollout/length": jnp.mean(samples.lengths.astype(jnp.float32)),
               "rollout/eos_fraction": jnp.mean(ended.astype(jnp.float32)),
               **logp_mismatch(rows["sample_token_logps"], out.token_logps, rows["loss_mask"])}
    kl_next = kl_coef
    if o.kl_target > 0:
        kl_next = adaptive_kl_coef(kl_coef, metrics["objective/kl"], scores.shape[0],
                                   target=o.kl_target, horizon=o.kl_horizon)
    return build(rows, out, ref, scores, o), metrics, kl_next


def logp_mismatch(sampler_logps, trainer_logps, mask) -> dict:
    """Per-token |log pi_sampler - log pi_trainer| over response tokens [b, t]: mean and max.
    One model graph serves both here, so this is ~0 in float32 at equal temperatures."""
    m = mask > 0
    d = jnp.where(m, jnp.abs(sampler_logps - trainer_logps), 0)
    n = jnp.maximum(jnp.sum(m), 1)
    return {"rollout/logp_mismatch_mean": jnp.sum(d) / n, "rollout/logp_mismatch_max": jnp.max(d)}


@jax.jit
def _token_counts(prompt_mask, lengths):
    """{"prompt": real prompt tokens of all rows [k B, p], "generated": sum of `lengths` [k B]}."""
    return {"prompt": jnp.sum(prompt_mask != 0), "generated": jnp.sum(lengths)}


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _repeat(ids, mask, k, mesh):
    """Prompts [B, p] -> [k B, p]: k copies one after another, rows split over the mesh."""
    out = jnp.concatenate([ids] * k), jnp.concatenate([mask] * k)
    return tuple(jax.lax.with_sharding_constraint(x, parallel.batch_shardings({"x": x}, mesh)["x"])
                 for x in out)


def make_rollout(c: ConfigDict, rec: Algorithm, reference: nnx.Module, scorer: Callable, *,
                 pad_id: int, eos_id: int | tuple[int, ...], mesh) -> Callable:
    """`prepare(state, prompts) -> {"batch": loss batch, "metrics": rollout metrics}`: sample,
    score, build; `prompts` is this process's share of the global prompt batch."""
    o, r = c.online, rec.rollout
    check_online(c, rec)
    chunk = c.model.logps_chunk or None
    temperature = scoring_temperature(c)
    # None (a LoRA run): the reference is the state's own base, its adapters off (no copy)
    ref_split = None if reference is None else nnx.split(reference)
    settings = settings_of(c, eos_id)

    def prepare(state, raw):
        g = parallel.global_batch(raw, mesh)
        ids, mask = g["input_ids"], g["attention_mask"]
        k = r.samples_per_prompt or o.num_generations
        model = merge_model(state)
        # k samples per prompt from one prefill each, rows laid out as `_repeat` lays out the
        # prompts (the same samples as sampling the repeated prompts with this key)
        s = sample(model, ids, mask, step_key(state), max_new_tokens=o.max_new_tokens,
                   temperature=o.temperature, top_k=o.top_k, top_p=float(o.top_p),
                   cache_rows=o.cache_rows or None, prefill_buckets=o.prefill_buckets,
                   gather_params=bool(o.gather_params),
                   eos_id=eos_id, pad_id=pad_id, mesh=mesh, num_samples=k)
        if k > 1:
            ids, mask = _repeat(ids, mask, k, mesh)
        graphdef, params = nnx.split(model)
        ref_graphdef, ref_params = ref_split or nnx.split(_base_of(model))
        rows, out, ref, ent = _score_rows(graphdef, params, ref_graphdef, ref_params, ids, mask,
                                          s, pad_id, chunk, temperature)
        scores = scorer(ids, s.tokens, rows)
        kl_coef = state.rest[KL_CTL][...] if adaptive_kl(c) else settings.kl_coef
        batch, metrics, kl_next = _assemble(rows, out, ref, ent, s, scores, kl_coef, r.batch,
                                            r.shaped_kl, settings)
        # global counts for fit's perf/*tokens_per_sec: every sampled row's prompt, and the
        # tokens generated for it (device scalars: read when the step's metrics are)
        res = {"batch": batch, "metrics": metrics, "tokens": _token_counts(mask, s.lengths)}
        if adaptive_kl(c):  # applied by `update` after this rollout's epochs (TRL's order)
            res["kl_coef_next"] = kl_next
        return res

    return prepare


def _base_of(model: nnx.Module) -> nnx.Module:
    """The policy decoder of a LoRA model with its adapters off (a view: the same arrays)."""
    from prefjax.models.lora import adapters_off
    from prefjax.pipeline.models import export_model

    return adapters_off(export_model(model))


def row_permutation(key: jax.Array, rows: int, *, paired: bool) -> jax.Array:
    """[rows] int32: a uniform permutation of the rows; with `paired`, one permutation of the
    pair index applied to both halves, so row i and its partner i + rows/2 stay partners."""
    if not paired:
        return jax.random.permutation(key, rows).astype(jnp.int32)
    if rows % 2:
        raise ValueError(f"a paired rollout needs an even number of rows, got {rows}")
    p = jax.random.permutation(key, rows // 2).astype(jnp.int32)
    return jnp.concatenate([p, p + rows // 2])


@functools.partial(jax.jit, static_argnames=("k", "paired", "mesh"))
def _minibatches(batch, k, paired, mesh, key=None):
    """`k` minibatches of `batch` (its rows first permuted by `key` when given), each laid out
    over the mesh's batch axes, in one program."""
    if key is not None:
        rows = next(iter(batch.values())).shape[0]
        idx = row_permutation(key, rows, paired=paired)
        batch = {name: jnp.take(v, idx, axis=0) for name, v in batch.items()}
    mbs = split_microbatches(batch, k, paired=paired)
    parts = [{key: v[i] for key, v in mbs.items()} for i in range(k)]
    return [jax.lax.with_sharding_constraint(p, batch_shardings(p, mesh)) for p in parts]


SHUFFLE_STREAM = 0x5F0FF1E  # folded into the step key: the shuffles' own random stream


def epoch_key(state, epoch: int) -> jax.Array:
    """The key of epoch `epoch`'s permutation of the rollout made at `state`."""
    return jax.random.fold_in(jax.random.fold_in(step_key(state), SHUFFLE_STREAM), epoch)


def _set_kl_coef(state, value):
    """`state` with its KLCoef set to `value` (placed like the value it replaces)."""
    rest = jax.tree.map(lambda x: x, state.rest)  # new Variable objects, same arrays
    old = rest[KL_CTL][...]
    rest[KL_CTL][...] = jax.device_put(np.asarray(value, np.float32), old.sharding)
    return state.replace(rest=rest)


def make_update(step, *, epochs: int, minibatches: int, paired: bool, mesh,
                shuffle: bool = True) -> Callable:
    """`(state, rollout) -> (state, metrics)`: `epochs` passes of `minibatches` updates; with
    `shuffle` (TRL's behaviour) each pass first permutes the rows with `epoch_key(state, e)`
    of the state the rollout was made at; otherwise every pass reuses the same contiguous
    slices. A rollout's `kl_coef_next` (adaptive KL) is written into the state afterwards."""
    if epochs < 1 or minibatches < 1:
        raise ValueError(f"online.epochs ({epochs}) and online.minibatches ({minibatches}) "
                         "must be >= 1")

    def update(state, rollout):
        keys = [epoch_key(state, e) for e in range(epochs)] if shuffle else None
        fixed = None if shuffle else _minibatches(rollout["batch"], minibatches, paired, mesh)
        ms = []
        for e in range(epochs):
            parts = (_minibatches(rollout["batch"], minibatches, paired, mesh, keys[e])
                     if shuffle else fixed)
            for p in parts:
                state, m = step(state, p)
                ms.append(m)
        if "kl_coef_next" in rollout:
            state = _set_kl_coef(state, jax.device_get(rollout["kl_coef_next"]))
        # averaged on the host: a few scalars per update, no eager ops on mesh-sharded arrays
        ms = jax.device_get(ms)
        metrics = {k: np.mean([m[k] for m in ms]) for k in ms[0]}
        metrics["nonfinite"] = max(m["nonfinite"] for m in ms)  # any bad update stops the run
        return state, {**metrics, **jax.device_get(rollout["metrics"])}

    return update
