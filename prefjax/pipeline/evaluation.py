"""Evaluation during a run: the loss's metrics on the held-out set, and sampled reward / KL.

The held-out metrics are those of the whole set as one batch (`held_out_set_fn`): each batch is
run forward alone, their outputs are put back in one batch's row layout and the loss runs once,
so token means (SFT's `token_mean`, the NLL terms) are token-weighted over the set and every
other metric is exact too. All return `state -> metrics` for `fit`; the sampled one uses the
shared jitted log-prob function (`prefjax.eval.logps_fn`), so a run compiles it once per shape,
and scores the sampler's true rows (`prefjax.eval.sample_metrics(scorer=...)`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.eval import sample_metrics
from prefjax.models.lora import adapters_off
from prefjax.pipeline.models import export_model, policy_of
from prefjax.train.build import eos_ids, init_source
from prefjax.train.reference import WithReference
from prefjax.train.state import merge_model
from prefjax.train.step import merge_microbatches
from prefjax.typing import Batch, LossFn, PolicyOut

_OUT = "policy_out."  # prefix of the PolicyOut fields among the set's merged leaves


def held_out_set_fn(loss_fn: LossFn, batches: list[dict], *, mesh, paired: bool,
                    tail_key: str | None, forward: Callable | None = None) -> Callable:
    """`state -> loss_fn's metrics (and "loss") on the whole held-out set as one batch`.

    batches: this process's share of k held-out batches of one layout (`eval_batches`), each
    joined into global arrays (`parallel.global_batch`) on first use. Each is run through
    `forward` (default `prefjax.lm.policy_out`; its additions, e.g. a live reference's
    log-probs, kept) without gradients; the outputs and batch keys are put in one batch's row
    layout (`merge_microbatches`: all chosen rows, all rejected rows, all tail rows) and
    `loss_fn` runs once on it. Exact for every loss: a token mean is the sum over the set's
    tokens over their count, a pair mean is over all pairs, and batch statistics (AOT's sorts)
    see the whole set. Memory: the set's PolicyOuts and batch keys ([N] and [N, t] leaves), not
    its activations. Packed keys (`packed_*`) feed only the forward and are left out.
    """
    from prefjax.train.step import run_forward

    if forward is None:
        from prefjax.lm import policy_out as forward
    replicated = NamedSharding(mesh, PartitionSpec())
    placed = None

    @jax.jit
    def outputs(state, batch: Batch) -> Batch:
        model = nnx.merge(state.graphdef, state.params, state.rest)
        out, full = run_forward(forward, model, batch)
        rows = {k: v for k, v in full.items() if not k.startswith("packed_")}
        return {**rows, **{_OUT + f: v for f, v in out._asdict().items() if v is not None}}

    @functools.partial(jax.jit, out_shardings=replicated)
    def set_metrics(parts: list[Batch]) -> dict:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)  # [k, b, ...]
        merged = merge_microbatches(stacked, paired=paired, tail_key=tail_key)
        out = PolicyOut(**{f: merged.get(_OUT + f) for f in PolicyOut._fields})
        batch = {k: v for k, v in merged.items() if not k.startswith(_OUT)}
        loss, metrics = loss_fn(out, batch)
        return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), {**metrics, "loss": loss})

    def run(state) -> dict[str, float]:
        nonlocal placed
        if placed is None:  # placed once, on first use
            placed = [parallel.global_batch(b, mesh, paired=paired, tail_key=tail_key)
                      for b in batches]
        with jax.set_mesh(mesh):
            parts = [outputs(state, b) for b in placed]
            return {k: float(v) for k, v in jax.device_get(set_metrics(parts)).items()}

    return run


def held_out_fn(evaluate: Callable, batches: list[dict], *, mesh, paired: bool,
                tail_key: str | None) -> Callable:
    """`state -> mean of the eval step's metrics` over this process's held-out batches.

    Kept for callers of the per-batch eval step: a mean of per-batch means, which is not the
    set's value for token means when batches hold different token counts (`held_out_set_fn`
    is; the pipeline uses it)."""
    placed = None

    def run(state) -> dict[str, float]:
        nonlocal placed
        if placed is None:  # placed once, on first use
            placed = [parallel.global_batch(b, mesh, paired=paired, tail_key=tail_key)
                      for b in batches]
        sums: dict[str, float] = {}
        for b in placed:
            for k, v in jax.device_get(evaluate(state, b)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(placed) for k, v in sums.items()}

    return run


def sampled_fn(c: ConfigDict, prompts: list[dict], *, reference: Callable, scorer: Callable,
               tokenizer, mesh) -> Callable:
    """`state -> {reward, kl, length}` of responses sampled from the state's policy on
    held-out prompts (this process's share of each batch); `reference() -> module` (a live
    reference is read from the state instead; None: the state's model with its LoRA adapters
    off)."""
    placed = None

    def run(state) -> dict[str, float]:
        nonlocal placed
        if placed is None:
            placed = [parallel.global_batch(p, mesh) for p in prompts]
        model = merge_model(state)
        ref = model.reference if isinstance(model, WithReference) else reference()
        if ref is None:  # a LoRA run's reference: its own base, adapters off (no copy)
            ref = adapters_off(export_model(model))
        return sample_metrics(policy_of(model), ref, placed, key=jax.random.key(c.seed + 7),
                              scorer=scorer, max_new_tokens=c.online.max_new_tokens,
                              eos_id=eos_ids(tokenizer, init_source(c)),
                              pad_id=tokenizer.pad_token_id,
                              chunk=c.model.logps_chunk or None, mesh=mesh)

    return run


def combined(held_out: Callable | None, sampled: Callable | None, *, prefix: str = "sample/"
             ) -> tuple[Callable, dict]:
    """`(eval_fn, last)`: held-out metrics plus sampled ones under `prefix` (no prefix without
    held-out metrics); `last` always holds the latest evaluation."""
    last: dict = {}

    def run(state) -> dict[str, float]:
        out = dict(held_out(state)) if held_out is not None else {}
        if sampled is not None:
            pre = prefix if held_out is not None else ""
            out.update({f"{pre}{k}": v for k, v in sampled(state).items()})
        last.clear()
        last.update(out)
        return out

    return run, last
