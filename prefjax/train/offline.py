"""Offline trainers from one config: SFT, reward model, DPO family, IPO, SimPO/ORPO/CPO, MPO.

`train(config, workdir)` builds data, model, reference, loss and step, runs `fit`, and exports
the final policy with `save_hf`. Every algorithm differs only in its loss, its data kind (pairs
or single sequences) and whether it needs reference log-probs; MPO's batches add reference-policy
samples as extra rows flagged by `ref_sample_mask`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from prefjax import losses, parallel
from prefjax.data import BatchLoader, add_reference_logps, collate_pairs, collate_sequences
from prefjax.lm import policy_out
from prefjax.paths import as_path, is_remote, upload
from prefjax.train import build
from prefjax.train.checkpoint import Checkpointer
from prefjax.train.loop import fit
from prefjax.train.reference import (
    POLICY_PARAMS,
    WithReference,
    live_reference_forward,
    unwrap_policy,
)
from prefjax.train.state import (
    abstract_train_state,
    create_train_state,
    merge_model,
    state_from_module,
    state_shardings,
)
from prefjax.train.step import build_eval_step, build_train_step

log = logging.getLogger(__name__)

SEQUENCE_ALGOS = ("sft",)
REF_KEY = "ref_sample_mask"


def needs_reference(algo: str, hp: Mapping[str, Any]) -> bool:
    """Whether loss `algo` with hyperparameters `hp` reads `batch["ref_logps"]`."""
    if algo in ("dpo", "ipo", "cdpo"):
        return not hp.get("reference_free", False)
    if algo == "mpo":
        return bool(hp.get("beta", 0)) and not hp.get("p_ref_uniform", False)
    return False


class MixedLoader:
    """Pairs plus reference-policy samples in one batch: `[chosen n, rejected n, samples m]`.

    Both loaders advance together; `state()` / `restore()` hold both positions, so MPO runs resume
    exactly like any other.
    """

    def __init__(self, pairs: BatchLoader, samples: BatchLoader):
        self.pairs, self.samples = pairs, samples

    def state(self) -> dict:
        return {"pairs": self.pairs.state(), "samples": self.samples.state()}

    def restore(self, state: Mapping) -> None:
        self.pairs.restore(state["pairs"])
        self.samples.restore(state["samples"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        p, s = next(self.pairs), next(self.samples)
        out = {k: np.concatenate([p[k], s[k]]) for k in ("input_ids", "attention_mask",
                                                          "loss_mask")}
        if "ref_logps" in p:  # sample rows never read theirs; zeros keep the key [b]
            out["ref_logps"] = np.concatenate([p["ref_logps"], np.zeros(len(s["input_ids"]),
                                                                          np.float32)])
        out[REF_KEY] = np.ones(len(s["input_ids"]), np.float32)
        return out


def _ref_samples(c: ConfigDict, tokenizer, train_ds, reference, workdir: str):
    """MPO's reference-policy samples as a tokenized completion dataset.

    generate: sample `mpo.num_ref_samples` responses (temperature 1) from the reference on the
        training prompts, once; stored in `workdir/ref_samples` so a resumed run reuses them.
    synthetic: the synthetic task's reference-policy generator. Else a completion-format file.
    """
    import datasets

    from prefjax.data import load_preference_data, tokenize_dataset
    from prefjax.data import synthetic as syn

    m, d = c.mpo, c.data
    if m.ref_samples == "generate":
        path = as_path(workdir) / "ref_samples"
        if (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        ds = generate_samples(reference, train_ds, num=m.num_ref_samples,
                              batch_size=c.train.batch_size, seed=c.seed,
                              max_new_tokens=min(d.max_response_length,
                                                 d.max_length - d.max_prompt_length),
                              tokenizer=tokenizer,
                              prompt_len=d.max_prompt_length)
        if parallel.is_main_process():
            ds.save_to_disk(str(path))  # written whole, then visible (datasets writes a tmp dir)
        return ds
    if m.ref_samples == "synthetic":
        ds = syn.make_sft_dataset(m.num_ref_samples, c.seed + 20_000)
    elif m.ref_samples:
        ds = load_preference_data(m.ref_samples, format="completion", on_bad_row=d.on_bad_row)
    else:
        raise ValueError("algo 'mpo' with loss.alpha > 0 needs reference-policy samples: set "
                         "mpo.ref_samples to generate | synthetic | a completion-format file")
    ds, _ = tokenize_dataset(ds, tokenizer, max_length=d.max_length,
                             max_prompt_length=d.max_prompt_length,
                             max_response_length=d.max_response_length, over_long=d.over_long)
    return ds


def generate_samples(model: nnx.Module, prompts_ds, *, num: int, batch_size: int, seed: int,
                     max_new_tokens: int, tokenizer, prompt_len: int):
    """`num` rows {prompt_ids, completion_ids}: one temperature-1 sample from `model` per
    prompt of `prompts_ds` (its `prompt_ids` column, cycled in a seeded order)."""
    import datasets

    from prefjax.data import collate_prompts
    from prefjax.sampling import sample

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = np.random.default_rng([seed, 3]).permutation(len(prompts_ds))
    order = np.resize(order, -(-num // batch_size) * batch_size)
    key = jax.random.key(seed + 3)
    rows: dict[str, list] = {"prompt_ids": [], "completion_ids": []}
    for i in range(0, len(order), batch_size):
        picked = prompts_ds.select([int(j) for j in order[i:i + batch_size]])["prompt_ids"]
        batch = collate_prompts([{"prompt_ids": p} for p in picked], pad_id=pad,
                                seq_len=prompt_len)
        s = sample(model, batch["input_ids"], batch["attention_mask"],
                   jax.random.fold_in(key, i), max_new_tokens=max_new_tokens, eos_id=eos,
                   pad_id=pad)
        tokens, lengths = np.asarray(s.tokens), np.asarray(s.lengths)
        for p, t, n in zip(picked, tokens, lengths):
            rows["prompt_ids"].append(list(p))
            rows["completion_ids"].append(t[:n].tolist())
    log.info("sampled %d reference responses (mean length %.1f)", num,
             np.mean([len(r) for r in rows["completion_ids"][:num]]))
    return datasets.Dataset.from_dict({k: v[:num] for k, v in rows.items()})


def write_config(c: ConfigDict, workdir: str | Path) -> None:
    """Write `workdir/config.json`; refuse to resume a workdir that ran another config."""
    path = as_path(workdir) / "config.json"
    now = json.loads(c.to_json_best_effort())
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(_flat(before)) | set(_flat(now))
                         if _flat(before).get(k) != _flat(now).get(k))
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed}); use a new "
                "workdir, or delete it to start over (re-running the same config resumes)")
    if parallel.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2, sort_keys=True))


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(c: ConfigDict, workdir: str) -> dict:
    """Run (or resume) the offline experiment `c` in `workdir`; returns the last eval metrics."""
    write_config(c, workdir)
    hp = c.loss.to_dict()
    loss = losses.get(c.algo, **hp)
    kind = "sft" if c.algo in SEQUENCE_ALGOS else "pairs"
    mode = c.reference.mode
    if mode not in ("precomputed", "live", "none"):
        raise ValueError(f"reference.mode must be precomputed | live | none, got {mode!r}")
    use_ref = needs_reference(c.algo, hp)
    if use_ref and mode == "none":
        raise ValueError(f"algo {c.algo!r} with loss {hp} needs reference log-probs but "
                         "reference.mode='none'; use 'precomputed' or 'live', or a "
                         "reference-free setting")
    tokenizer = build.load_tokenizer(c)
    train_ds, eval_ds = build.load_data(c, tokenizer, kind)
    mesh, rules = build.mesh_and_rules(c)
    optimizer = build.make_optimizer(c.train)
    decoder = build.decoder_fn(c, tokenizer)
    chunk = c.model.logps_chunk or None
    seq_len = c.data.max_length
    pad = tokenizer.pad_token_id
    collate = functools.partial(collate_pairs if kind == "pairs" else collate_sequences,
                                pad_id=pad, seq_len=seq_len)
    columns = ("ref_chosen_logps", "ref_rejected_logps") if kind == "pairs" else ("ref_logps",)

    forward, trainable = (functools.partial(policy_out, chunk_size=chunk), nnx.Param)
    if c.algo == "reward_bt":
        from prefjax.models.heads import RewardModel

        base = decoder
        decoder = (RewardModel(base, rngs=nnx.Rngs(c.seed)) if isinstance(base, nnx.Module)
                   else lambda rngs: RewardModel(base(rngs), rngs=rngs))
    elif use_ref and mode == "precomputed":
        from prefjax.eval import logps_fn

        ref, f = build.reference_module(c, decoder), logps_fn(chunk)
        ref_fn = functools.partial(f, ref)
        bs = c.train.batch_size
        train_ds = add_reference_logps(train_ds, ref_fn, batch_size=bs, collate=collate,
                                       columns=columns)
        eval_ds = add_reference_logps(eval_ds, ref_fn, batch_size=bs, collate=collate,
                                      columns=columns)
    elif use_ref and mode == "live":
        # both halves concrete, so the state is placed from the module (no weights baked into
        # a jitted init)
        policy, ref = build.materialize(decoder, c.seed), build.reference_module(c, decoder)
        decoder = WithReference(policy, nnx.clone(ref) if ref is policy else ref)
        forward, trainable = live_reference_forward(chunk), POLICY_PARAMS

    pi, pc = parallel.process_index(), parallel.process_count()
    batches = BatchLoader(train_ds, batch_size=c.train.batch_size, collate=collate, seed=c.seed,
                          process_index=pi, process_count=pc)
    if c.algo == "mpo" and c.loss.alpha:
        refs = _ref_samples(c, tokenizer, train_ds, build.reference_module(c, decoder), workdir)
        samples = BatchLoader(refs, batch_size=c.mpo.samples_per_batch,
                              seed=c.seed + 1, process_index=pi, process_count=pc,
                              collate=functools.partial(collate_sequences, pad_id=pad,
                                                        seq_len=seq_len))
        batches = MixedLoader(batches, samples)

    if isinstance(decoder, nnx.Module):  # loaded weights: place them once (also the restore
        # target: restore reads only shapes and dtypes from it)
        state0, shardings = state_from_module(decoder, optimizer, mesh=mesh, rules=rules,
                                              seed=c.seed, trainable=trainable)
        abstract, init_state = state0, lambda: state0
    else:
        abstract = abstract_train_state(decoder, optimizer, seed=c.seed, trainable=trainable)
        shardings = state_shardings(abstract, mesh, rules)
        init_state = lambda: create_train_state(  # noqa: E731
            decoder, optimizer, mesh=mesh, rules=rules, seed=c.seed, trainable=trainable)[0]

    paired = kind == "pairs"
    step = build_train_step(loss, optimizer, mesh=mesh, state_shardings=shardings,
                            forward=forward, grad_accum=c.train.grad_accum,
                            max_grad_norm=c.train.max_grad_norm, paired=paired)
    evaluate = build_eval_step(loss, mesh=mesh, state_shardings=shardings, forward=forward,
                               paired=paired)
    eval_batches = _eval_batches(eval_ds, collate, c, batches)
    sampled = _sampled_eval(c, eval_ds, decoder, tokenizer) if c.eval.sample else None
    last_eval: dict = {}

    def eval_fn(state):
        sums: dict[str, float] = {}
        for raw in eval_batches:
            for k, v in jax.device_get(evaluate(state, parallel.shard_batch(raw, mesh))).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        last_eval.clear()
        last_eval.update({k: v / len(eval_batches) for k, v in sums.items()})
        if sampled is not None:
            last_eval.update({f"sample/{k}": v for k, v in sampled(state).items()})
        return last_eval

    t = c.train
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", keep=t.keep_checkpoints,
                        save_every=t.save_every, best_metric=t.best_metric or None)
    with ckpt:
        state = fit(init_state, step, batches, num_steps=t.num_steps, workdir=workdir,
                    checkpointer=ckpt, abstract_state=abstract, shardings=shardings,
                    prepare=lambda _, raw: parallel.shard_batch(raw, mesh), eval_fn=eval_fn,
                    eval_every=t.eval_every, log_every=t.log_every, progress=None)
    if t.export_hf and parallel.is_main_process():
        export(merge_model(state), build.export_dir(workdir), tokenizer)
    return dict(last_eval)


def _sampled_eval(c: ConfigDict, eval_ds, decoder, tokenizer):
    """`state -> {reward, kl, length}` of responses sampled on held-out prompts (`eval.sample`).

    The reward is online.reward (the synthetic oracle r*, or a reward model); KL is measured
    against the reference (`reference.source`, else the initial policy).
    """
    from prefjax.data import collate_prompts
    from prefjax.eval import sample_metrics
    from prefjax.train.online import eval_reward_fn

    if c.algo in ("sft", "reward_bt"):
        raise ValueError(f"eval.sample needs a policy trained against a reference; algo "
                         f"{c.algo!r} has none")
    reference = build.reference_module(c, decoder)
    if reference is decoder:
        reference = nnx.clone(decoder)
    bs = c.train.batch_size
    n = min(len(eval_ds), c.eval.num_prompts) // bs * bs
    if n == 0:
        raise ValueError(f"eval.sample needs at least one batch of {bs} held-out prompts")
    rows = eval_ds.select(range(n))["prompt_ids"]
    collate = functools.partial(collate_prompts, pad_id=tokenizer.pad_token_id,
                                seq_len=c.data.max_prompt_length)
    prompts = [collate([{"prompt_ids": p} for p in rows[i:i + bs]]) for i in range(0, n, bs)]
    reward = eval_reward_fn(c, tokenizer)

    def sampled(state):
        return sample_metrics(unwrap_policy(merge_model(state)), reference, prompts,
                              key=jax.random.key(c.seed + 7), reward_fn=reward,
                              max_new_tokens=c.online.max_new_tokens,
                              eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                              chunk=c.model.logps_chunk or None)

    return sampled


def _eval_batches(eval_ds, collate, c: ConfigDict, train_batches) -> list[dict]:
    """The held-out set as whole batches of `train.batch_size` (a remainder is reported)."""
    bs = c.train.batch_size
    n = len(eval_ds) // bs * bs
    if n == 0:
        raise ValueError(f"the eval set has {len(eval_ds)} rows, fewer than one batch of {bs}")
    if n < len(eval_ds):
        log.warning("evaluating on %d of %d held-out rows (whole batches of %d)", n,
                    len(eval_ds), bs)
    pi, pc = parallel.process_index(), parallel.process_count()
    loader = BatchLoader(eval_ds, batch_size=bs, collate=collate, seed=0, num_epochs=1,
                         process_index=pi, process_count=pc)
    out = list(loader)
    if isinstance(train_batches, MixedLoader):  # MPO eval batches carry reference samples too
        samples = train_batches.samples
        probe = BatchLoader(samples.dataset, batch_size=samples.batch_size,
                            collate=samples.collate, seed=samples.seed + 1, process_index=pi,
                            process_count=pc)
        mixed = MixedLoader(iter(out), probe)
        out = [next(mixed) for _ in range(len(out))]
    return out


def export(model: nnx.Module, path: Path, tokenizer) -> Path:
    """The trained policy as an HF folder (a reward model exports its decoder + head)."""
    from prefjax.models.heads import RewardModel
    from prefjax.models.hf import save_hf

    if is_remote(path):  # save_hf writes local files; copy them up afterwards
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            export(model, Path(tmp), tokenizer)
            upload(tmp, path)
        return path
    model = unwrap_policy(model)
    if isinstance(model, RewardModel):
        from prefjax.models.heads import save_reward_model

        return save_reward_model(model, path, tokenizer=tokenizer)
    return save_hf(model, path, tokenizer=tokenizer)
