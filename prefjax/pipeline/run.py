"""The one pipeline: load models -> data or rollouts -> fit -> evaluate -> export.

`train(config, workdir)` reads `config.algo`'s record (`prefjax.losses.records`) and wires the
pieces of the sibling modules; it knows no algorithm by name. Re-running in the same workdir
resumes (schedule-only config changes allowed, see `workdir.write_config`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from ml_collections import ConfigDict

from prefjax import losses, parallel
from prefjax.losses import records
from prefjax.paths import as_path
from prefjax.pipeline import batches as B
from prefjax.pipeline import evaluation, models, rollouts
from prefjax.pipeline.export import adapter_dir, export, export_adapter
from prefjax.pipeline.extra_rows import extra_rows_dataset
from prefjax.pipeline.rewards import reward_function
from prefjax.pipeline.workdir import write_config
from prefjax.train import build
from prefjax.train.checkpoint import Checkpointer
from prefjax.train.loop import fit
from prefjax.train.state import merge_model
from prefjax.train.step import build_train_step

log = logging.getLogger(__name__)

MODES = ("precomputed", "live", "none")


class Plan(NamedTuple):
    """What `fit` runs: the trained model, the step, the host batches and how each becomes the
    step's input, and the evaluation."""

    trainee: models.Trainee
    step: object
    batches: object
    prepare: object
    eval_fn: object
    last_eval: dict


def check(c: ConfigDict, rec: records.Algorithm, hp: dict) -> None:
    """Fail at start, naming the field, for a reference mode the record cannot use."""
    if c.reference.mode not in MODES:
        raise ValueError(f"reference.mode must be one of {' | '.join(MODES)}, got "
                         f"{c.reference.mode!r}")
    if not rec.online and rec.needs_reference(hp) and c.reference.mode == "none":
        raise ValueError(f"algo {rec.name!r} with loss {hp} needs reference log-probs but "
                         "reference.mode='none'; use 'precomputed' or 'live', or a "
                         "reference-free setting")
    if c.eval.sample and not rec.online and not rec.sampled_eval:
        raise ValueError(f"eval.sample needs a policy trained against a reference; algo "
                         f"{rec.name!r} has none")


def train(c: ConfigDict, workdir: str) -> dict:
    """Run (or resume) experiment `c` in `workdir`; returns the last evaluation's metrics."""
    rec = records.get(c.algo)
    hp = c.loss.to_dict()
    loss = losses.get(rec.loss, **hp)
    check(c, rec, hp)
    write_config(c, workdir)
    tokenizer = build.load_tokenizer(c)
    train_ds, eval_ds = build.load_data(c, tokenizer, rec.data)
    mesh, rules = build.mesh_and_rules(c)
    optimizer = build.make_optimizer(c.train)
    decoder = build.decoder_fn(c, tokenizer, mesh=mesh, rules=rules)
    reference = models.lazy_reference(c, decoder, mesh=mesh, rules=rules)
    make = online_plan if rec.online else offline_plan
    plan = make(c, rec, loss, tokenizer, train_ds, eval_ds, decoder, reference, optimizer,
                mesh, rules, workdir)
    t, tr = c.train, plan.trainee
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", keep=t.keep_checkpoints,
                        save_every=t.save_every, best_metric=t.best_metric or None,
                        frozen=tr.frozen, write_gb=t.checkpoint_write_gb)
    with ckpt:
        state = fit(tr.init_state, plan.step, plan.batches, num_steps=t.num_steps,
                    workdir=workdir, checkpointer=ckpt, abstract_state=tr.abstract,
                    shardings=tr.shardings, prepare=plan.prepare, eval_fn=plan.eval_fn,
                    eval_every=t.eval_every, log_every=t.log_every, frozen_rest=tr.frozen_rest,
                    **efficiency_of(c, rec, hp))
    if t.export_hf:
        export(merge_model(state), build.export_dir(workdir), tokenizer)
        if models.uses_adapters(c) and c.lora.export_adapter:  # also the PEFT adapter folder
            export_adapter(merge_model(state), adapter_dir(workdir),
                           base_model=build.init_source(c))
    return dict(plan.last_eval)


def efficiency_of(c: ConfigDict, rec: records.Algorithm, hp: dict) -> dict:
    """fit's `flops` and `peak_flops` (prefjax.train.efficiency): forward + backward, plus a
    live reference's forward; online, each epoch's update plus the policy and reference scoring
    forwards (sampling is not counted)."""
    from prefjax.train import efficiency

    live = rec.needs_reference(hp) and c.reference.mode == "live"
    passes = 3.0 * c.online.epochs + 2.0 if rec.online else 3.0 + float(live)
    try:
        flops = efficiency.model_flops_of(c, passes=passes)
    except (ValueError, KeyError, TypeError, OSError) as e:  # log without FLOPs
        log.warning("model FLOPs not logged: %s", e)
        flops = None
    dtype = {"bfloat16": "bfloat16"}.get(c.model.dtype, "float32")
    return {"flops": flops, "peak_flops": efficiency.peak_flops(
        c.train.get("peak_flops", 0.0), dtype)}


def offline_plan(c, rec, loss, tokenizer, train_ds, eval_ds, decoder, reference, optimizer,
                 mesh, rules, workdir) -> Plan:
    """Data -> batches: reference columns or a live reference, the extra row group."""
    hp = c.loss.to_dict()
    collate = B.collate_fn(rec, c, tokenizer.pad_token_id)
    use_ref = rec.needs_reference(hp) and c.reference.mode != "none"
    live, base_ref = None, False
    if use_ref and c.reference.mode == "precomputed":
        train_ds, eval_ds = B.add_reference_columns(rec, (train_ds, eval_ds), reference, collate,
                                                    c, mesh=mesh, rules=rules, workdir=workdir)
    elif use_ref and models.uses_adapters(c):  # LoRA: its own base (adapters off) scores
        base_ref = True
    elif use_ref:
        live = reference()
    tail = rec.tail_key(hp)
    extra = None
    if tail is not None:
        extra = extra_rows_dataset(c, rec, tokenizer, train_ds, reference, workdir, mesh=mesh)
    if not c.eval.sample or models.base_is_reference(c):  # nothing reads it any more: free it
        reference.cache_clear()
    else:
        # built now, while the policy it may copy still has its weights: they move into the
        # train state (`models.trainee`)
        reference()
    if B.packing_applies(rec, c, tail):  # after the reference columns: those stay padded
        collate = B.packed_collate(collate, rec, c)
    batches = B.train_loader(train_ds, collate, c, extra=extra, rec=rec)
    trainee = models.trainee(c, rec, decoder, optimizer=optimizer, mesh=mesh, rules=rules,
                             live_reference=live, base_reference=base_ref)
    kw = dict(mesh=mesh, state_shardings=trainee.shardings, forward=trainee.forward,
              paired=rec.paired, tail_key=tail, process_blocks=1)
    step = build_train_step(loss, optimizer, grad_accum=c.train.grad_accum,
                            max_grad_norm=c.train.max_grad_norm, **kw)
    # the loss of the whole held-out set as one batch (token means token-weighted over it)
    held = evaluation.held_out_set_fn(loss, B.eval_batches(eval_ds, collate, c, batches),
                                      mesh=mesh, paired=rec.paired, tail_key=tail,
                                      forward=trainee.forward)
    sampled = None
    if c.eval.sample:
        prompts = B.prompt_batches(eval_ds, c, tokenizer.pad_token_id, c.eval.num_prompts)
        ref_fn = (lambda: None) if models.base_is_reference(c) else reference  # None: base
        sampled = evaluation.sampled_fn(c, prompts, reference=ref_fn,
                                        scorer=reward_function(c, mesh=mesh, rules=rules),
                                        tokenizer=tokenizer, mesh=mesh)
    eval_fn, last = evaluation.combined(held, sampled)

    def prepare(_, raw):
        return parallel.global_batch(raw, mesh, paired=rec.paired, tail_key=tail)

    return Plan(trainee, step, batches, prepare, eval_fn, last)


def online_plan(c, rec, loss, tokenizer, train_ds, eval_ds, decoder, reference, optimizer,
                mesh, rules, workdir) -> Plan:
    """Prompts -> rollouts: sample with the current policy, score, build the loss's batch."""
    del workdir
    # every EOS id of the model (generation_config.json may list several)
    o, pad, eos = c.online, tokenizer.pad_token_id, build.eos_ids(tokenizer, build.init_source(c))
    scorer = reward_function(c, mesh=mesh, rules=rules)
    ref = None if models.base_is_reference(c) else reference()  # None: adapters off
    trainee = models.trainee(c, rec, decoder, optimizer=optimizer, mesh=mesh, rules=rules)
    step = build_train_step(loss, optimizer, mesh=mesh, state_shardings=trainee.shardings,
                            forward=trainee.forward, grad_accum=c.train.grad_accum,
                            max_grad_norm=c.train.max_grad_norm, paired=rec.paired,
                            process_blocks=1)
    update = rollouts.make_update(step, epochs=o.epochs, minibatches=o.minibatches,
                                  paired=rec.paired, mesh=mesh)
    prepare = rollouts.make_rollout(c, rec, ref, scorer, pad_id=pad, eos_id=eos, mesh=mesh)
    batches = B.train_loader(train_ds, B.collate_fn(rec, c, pad), c)
    prompts = B.prompt_batches(eval_ds, c, pad, c.eval.num_prompts, shuffle=True)
    sampled = evaluation.sampled_fn(c, prompts, reference=lambda: ref, scorer=scorer,
                                    tokenizer=tokenizer, mesh=mesh)
    eval_fn, last = evaluation.combined(None, sampled)
    return Plan(trainee, update, batches, prepare, eval_fn, last)
