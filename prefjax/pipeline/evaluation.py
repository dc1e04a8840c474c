"""Evaluation during a run: the loss's metrics on held-out batches, and sampled reward / KL.

Both return `state -> metrics` for `fit`; the sampled one uses the shared jitted log-prob
function (`prefjax.eval.logps_fn`), so a run compiles it once per shape, and scores the
sampler's true rows (`prefjax.eval.sample_metrics(scorer=...)`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.eval import sample_metrics
from prefjax.pipeline.models import policy_of
from prefjax.train.reference import WithReference
from prefjax.train.state import merge_model


def held_out_fn(evaluate: Callable, batches: list[dict], *, mesh, paired: bool,
                tail_key: str | None) -> Callable:
    """`state -> mean of the eval step's metrics` over this process's held-out batches."""
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
    reference is read from the state instead)."""
    placed = None

    def run(state) -> dict[str, float]:
        nonlocal placed
        if placed is None:
            placed = [parallel.global_batch(p, mesh) for p in prompts]
        model = merge_model(state)
        ref = model.reference if isinstance(model, WithReference) else reference()
        return sample_metrics(policy_of(model), ref, placed, key=jax.random.key(c.seed + 7),
                              scorer=scorer, max_new_tokens=c.online.max_new_tokens,
                              eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
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
