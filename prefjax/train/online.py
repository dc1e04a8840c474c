"""Online trainers: sample -> score -> (old, ref log-probs) -> update epochs, for PPO, P3O and
online DPO.

One `fit` step is one rollout: `prepare` samples responses to a batch of prompts with the current
policy (`prefjax.sampling`), scores them (the synthetic task's ground-truth reward as an oracle,
or a reward model exported by configs/rm_synthetic.py), computes the sampling policy's and the
reference's log-probs, and builds the loss's batch; the train step then runs
`online.epochs` x `online.minibatches` optimizer updates on it. The rollout key is
`fold_in(state.rng, iteration)`, so a resumed run samples exactly what the original would have.

  ppo         `PolicyWithValue`; per-token KL-shaped rewards, GAE, whitened advantages.
  p3o         two samples per prompt (rows [:B] y1, [B:] y2); pairwise policy gradient.
  online_dpo  two samples per prompt, the higher-scored one is "chosen"; the DPO loss.
All log-probs are of the policy itself (temperature 1); sampling at another temperature makes
the update slightly off-policy, as in TRL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from prefjax import losses, parallel
from prefjax.data import BatchLoader, collate_prompts
from prefjax.data import synthetic as syn
from prefjax.eval import sample_metrics, scoring_rows
from prefjax.lm import policy_out
from prefjax.losses.ppo import gae, kl_shaped_rewards, rollout_metrics, whiten
from prefjax.parallel import batch_shardings
from prefjax.paths import as_path
from prefjax.sampling import sample, training_rows
from prefjax.train import build
from prefjax.train.checkpoint import Checkpointer
from prefjax.train.loop import fit
from prefjax.train.offline import export, write_config
from prefjax.train.state import merge_model, state_from_module, step_key
from prefjax.train.step import build_train_step, split_microbatches

log = logging.getLogger(__name__)

LOSS_OF = {"ppo": "ppo", "p3o": "p3o", "online_dpo": "dpo"}
PAIRED = ("p3o", "online_dpo")


def reward_function(c: ConfigDict) -> Callable:
    """`(prompt_ids [b, p] left-padded, tokens [b, n], rows) -> scores [b]`: the oracle r* or a
    reward model, each one jitted call (no eager ops on mesh-sharded arrays)."""
    if c.online.reward == "oracle":
        if c.data.source != "synthetic":
            raise ValueError("online.reward='oracle' is the synthetic task's ground truth; with "
                             f"data.source={c.data.source!r} set online.reward to a reward model "
                             "folder (an rm run's workdir or its export)")
        oracle = jax.jit(syn.reward_of_samples)
        return lambda prompt_ids, tokens, rows: oracle(prompt_ids, tokens)
    from prefjax.models.heads import HEAD_FILE, RewardModel

    folder = build.hf_folder(c.online.reward)
    if not (Path(folder) / HEAD_FILE).exists():
        raise FileNotFoundError(f"online.reward={c.online.reward!r}: no {HEAD_FILE} in {folder}; "
                                "point it at a reward-model run (configs/rm_synthetic.py)")
    rm = RewardModel.from_hf(folder, rngs=nnx.Rngs(0))
    graphdef, st = nnx.split(rm)
    f = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
    return lambda prompt_ids, tokens, rows: f(st, rows["input_ids"], rows["attention_mask"])


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef", "pad_id", "chunk"))
def _score_rows(graphdef, params, ref_graphdef, ref_params, ids, mask, samples, pad_id, chunk):
    """Training rows of prompts + samples, and the sampling policy's and the reference's
    PolicyOuts of them (one forward each, no gradient)."""
    rows = scoring_rows(ids, mask, samples, pad_id=pad_id)
    out = policy_out(nnx.merge(graphdef, params), rows, chunk_size=chunk)
    ref = policy_out(nnx.merge(ref_graphdef, ref_params), rows, chunk_size=chunk)
    return rows, out, ref


class _Frozen(tuple):
    """A hashable record of settings (a static jit argument)."""

    def __new__(cls, **kw):
        self = super().__new__(cls, sorted(kw.items()))
        self.__dict__.update(kw)
        return self


@functools.partial(jax.jit, static_argnames=("algo", "o"))
def _assemble(rows, out, ref, samples, scores, algo, o):
    """The loss's batch and the rollout metrics from scored samples (one compiled program: on a
    mesh, eager ops on sharded arrays each run their own small collective program)."""
    scores = jnp.asarray(scores, jnp.float32)
    ended = jnp.any((samples.tokens == o.eos_id) & (samples.mask > 0), axis=1)
    scores = scores - o.missing_eos_penalty * (~ended)
    kl_coef = o.kl_coef if algo == "ppo" else 0.0
    metrics = {**rollout_metrics(scores, out.token_logps, ref.token_logps, rows["loss_mask"],
                                 kl_coef=kl_coef),
               # TRL's estimate: -log pi(y|x) of the sampled responses, summed over tokens
               "objective/entropy": -jnp.mean(out.logps),
               "rollout/length": jnp.mean(samples.lengths.astype(jnp.float32)),
               "rollout/eos_fraction": jnp.mean(ended.astype(jnp.float32))}
    if algo == "ppo":
        batch = _ppo_batch(rows, out, ref, scores, o)
    elif algo == "p3o":
        batch = {**rows, "old_logps": out.logps, "ref_logps": ref.logps, "rewards": scores,
                 "old_token_logps": out.token_logps}
    else:
        batch = _dpo_batch(rows, ref.logps, scores)
    return batch, metrics


def make_rollout(c: ConfigDict, reference: nnx.Module, reward_fn: Callable, *, pad_id: int,
                 eos_id: int, mesh) -> Callable:
    """`prepare(state, prompts) -> {"batch": loss batch, "metrics": rollout metrics}`: sample,
    score, build; three jitted calls after the sampler's."""
    o, algo = c.online, c.algo
    chunk = c.model.logps_chunk or None
    ref_graphdef, ref_params = nnx.split(reference)
    settings = _Frozen(eos_id=eos_id, missing_eos_penalty=float(o.missing_eos_penalty),
                       kl_coef=float(o.kl_coef), gamma=float(o.gamma), lam=float(o.lam),
                       whiten_rewards=bool(o.whiten_rewards))

    def prepare(state, raw):
        ids, mask = raw["input_ids"], raw["attention_mask"]
        if algo in PAIRED:  # two samples per prompt: rows [:B] y1, [B:] y2
            ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])
        model = merge_model(state)
        s = sample(model, ids, mask, step_key(state), max_new_tokens=o.max_new_tokens,
                   temperature=o.temperature, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
        graphdef, params = nnx.split(model)
        rows, out, ref = _score_rows(graphdef, params, ref_graphdef, ref_params, ids, mask, s,
                                     pad_id, chunk)
        scores = reward_fn(ids, s.tokens, rows)
        batch, metrics = _assemble(rows, out, ref, s, scores, algo, settings)
        return {"batch": batch, "metrics": metrics}

    return prepare


def _ppo_batch(rows, out, ref, scores, o):
    """PPO's batch: KL-shaped per-token rewards, GAE, whitened advantages (traced in _assemble)."""
    r = kl_shaped_rewards(scores, out.token_logps, ref.token_logps, rows["loss_mask"],
                          kl_coef=o.kl_coef)
    if o.whiten_rewards:
        r = whiten(r, rows["loss_mask"], shift_mean=False)
    adv, ret = gae(r, out.values, rows["loss_mask"], gamma=o.gamma, lam=o.lam)
    return {**rows, "old_token_logps": out.token_logps, "old_values": out.values,
            "advantages": whiten(adv, rows["loss_mask"]), "returns": ret}


def _dpo_batch(rows, ref_logps, scores):
    """Order each prompt's two samples as chosen (higher score) then rejected; ties keep y1."""
    n = scores.shape[0] // 2
    swap = scores[n:] > scores[:n]
    idx = jnp.arange(2 * n)
    first = jnp.where(swap, idx[n:], idx[:n])
    second = jnp.where(swap, idx[:n], idx[n:])
    order = jnp.concatenate([first, second])
    take = lambda x: jnp.take(x, order, axis=0)  # noqa: E731
    return {**{k: take(v) for k, v in rows.items()}, "ref_logps": take(ref_logps),
            "rewards": take(scores)}


@functools.partial(jax.jit, static_argnames=("k", "paired", "mesh"))
def _minibatches(batch, k, paired, mesh):
    """`k` minibatches of `batch`, each laid out over the mesh's batch axes, in one program."""
    mbs = split_microbatches(batch, k, paired=paired)
    parts = [{key: v[i] for key, v in mbs.items()} for i in range(k)]
    return [jax.lax.with_sharding_constraint(p, batch_shardings(p, mesh)) for p in parts]


def make_update(step, *, epochs: int, minibatches: int, paired: bool, mesh) -> Callable:
    """`(state, rollout) -> (state, metrics)`: `epochs` passes of `minibatches` updates."""

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


def train(c: ConfigDict, workdir: str) -> dict:
    """Run (or resume) the online experiment `c` in `workdir`; returns the last eval metrics."""
    from prefjax.models.heads import PolicyWithValue

    write_config(c, workdir)
    if c.algo not in LOSS_OF:
        raise ValueError(f"online algo must be one of {list(LOSS_OF)}, got {c.algo!r}")
    loss = losses.get(LOSS_OF[c.algo], **c.loss.to_dict())
    o = c.online
    if o.epochs < 1 or o.minibatches < 1:
        raise ValueError(f"online.epochs ({o.epochs}) and online.minibatches ({o.minibatches}) "
                         "must be >= 1")
    tokenizer = build.load_tokenizer(c)
    prompts, held = build.load_data(c, tokenizer, "prompts")
    mesh, rules = build.mesh_and_rules(c)
    optimizer = build.make_optimizer(c.train)
    decoder = build.decoder_fn(c, tokenizer)
    seed = c.seed
    policy = build.materialize(decoder, seed)
    reference = build.reference_module(c, decoder)
    if reference is policy:
        reference = nnx.clone(policy)
    if c.algo == "ppo":
        policy = PolicyWithValue(policy, rngs=nnx.Rngs(seed + 1))
    state0, shardings = state_from_module(policy, optimizer, mesh=mesh, rules=rules, seed=seed)
    del policy
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    reward_fn = reward_function(c)
    prepare = make_rollout(c, reference, reward_fn, pad_id=pad, eos_id=eos, mesh=mesh)
    paired = c.algo in PAIRED
    chunk = c.model.logps_chunk or None
    step = build_train_step(loss, optimizer, mesh=mesh, state_shardings=shardings,
                            forward=functools.partial(policy_out, chunk_size=chunk),
                            grad_accum=c.train.grad_accum, max_grad_norm=c.train.max_grad_norm,
                            paired=paired)
    update = make_update(step, epochs=o.epochs, minibatches=o.minibatches, paired=paired,
                         mesh=mesh)
    collate = functools.partial(collate_prompts, pad_id=pad, seq_len=c.data.max_prompt_length)
    pi, pc = parallel.process_index(), parallel.process_count()
    batches = BatchLoader(prompts, batch_size=c.train.batch_size, collate=collate, seed=seed,
                          process_index=pi, process_count=pc)
    n_eval = min(len(held), c.eval.num_prompts) // c.train.batch_size * c.train.batch_size
    eval_prompts = list(BatchLoader(held.select(range(n_eval)), batch_size=c.train.batch_size,
                                    collate=collate, seed=0, num_epochs=1))
    last_eval: dict = {}

    eval_reward = eval_reward_fn(c, tokenizer, reward_fn)

    def eval_fn(state):
        model = merge_model(state)
        res = sample_metrics(model, reference, eval_prompts, key=jax.random.key(seed + 7),
                             reward_fn=eval_reward,
                             max_new_tokens=o.max_new_tokens, eos_id=eos, pad_id=pad,
                             chunk=chunk)
        last_eval.clear()
        last_eval.update(res)
        return res

    t = c.train
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", keep=t.keep_checkpoints,
                        save_every=t.save_every, best_metric=t.best_metric or None)
    with ckpt:
        state = fit(lambda: state0, update, batches, num_steps=t.num_steps, workdir=workdir,
                    checkpointer=ckpt, abstract_state=state0, shardings=shardings,
                    prepare=prepare, eval_fn=eval_fn, eval_every=t.eval_every,
                    log_every=t.log_every)
    if t.export_hf and parallel.is_main_process():
        model = merge_model(state)
        export(model.decoder if isinstance(model, PolicyWithValue) else model,
               build.export_dir(workdir), tokenizer)
    return dict(last_eval)


def eval_reward_fn(c: ConfigDict, tokenizer, reward_fn: Callable | None = None) -> Callable:
    """`(prompt_ids, tokens) -> [b]` for `prefjax.eval.sample_metrics` from `reward_function`."""
    reward_fn = reward_fn or reward_function(c)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return lambda p, t: reward_fn(p, t, _rows(p, t, pad, eos))


@functools.partial(jax.jit, static_argnames=("pad_id", "eos_id"))
def _rows(prompt_ids, tokens, pad_id, eos_id):
    """Training rows of prompts + sampled tokens (for a reward model at evaluation)."""
    from prefjax.sampling import Samples

    tokens = jnp.asarray(tokens)
    eos = tokens == eos_id
    mask = (jnp.cumsum(eos, axis=1) - eos == 0).astype(jnp.int32)
    s = Samples(tokens, mask, jnp.zeros(mask.shape, jnp.float32), mask.sum(1))
    prompt_mask = (jnp.asarray(prompt_ids) != pad_id).astype(jnp.int32)
    return training_rows(prompt_ids, prompt_mask, s, pad_id=pad_id)
