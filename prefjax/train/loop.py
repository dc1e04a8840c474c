"""fit(): batches -> jitted step -> metrics -> periodic eval -> checkpoint; resumes by re-running.

The loop is algorithm-agnostic: offline trainers pass a `BatchLoader` and `shard_batch`, online
trainers pass a prompt loader and a `prepare` that samples and scores (it may read the state).
Re-running in a workdir that holds checkpoints restores the latest one: parameters, optimizer
state, RNG, the data position and the partly accumulated logging window, so the metrics of an
interrupted-and-resumed run equal those of an uninterrupted one (timing keys `perf/*` aside).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from prefjax.metrics import MetricsWriter, ProgressBar
from prefjax.parallel import process_count
from prefjax.train.checkpoint import Checkpointer
from prefjax.train.efficiency import EfficiencyWindow, ModelFlops, batch_stats
from prefjax.train.state import TrainState

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient; the update was not applied."""


class Window:
    """Running sums of step metrics between two log records (JSON-serialisable for resume)."""

    def __init__(self, sums: Mapping[str, float] | None = None, count: int = 0,
                 tokens: int = 0, kinds: Mapping[str, int] | None = None):
        self.sums, self.count, self.tokens = dict(sums or {}), count, tokens
        self.kinds = dict(kinds or {})  # tokens by kind (online: prompt, generated)
        self.t0 = time.perf_counter()

    def add(self, metrics: Mapping[str, float], tokens: int,
            kinds: Mapping[str, int] | None = None) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.tokens += tokens
        for k, v in (kinds or {}).items():
            self.kinds[k] = self.kinds.get(k, 0) + v

    def means(self) -> dict[str, float]:
        out = {k: v / self.count for k, v in self.sums.items()}
        out.pop("nonfinite", None)  # always 0 in a logged window: a non-finite step stops the run
        return out

    def perf(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"perf/steps_per_sec": self.count / dt, "perf/tokens_per_sec": self.tokens / dt,
                **{f"perf/{k}_tokens_per_sec": v / dt for k, v in self.kinds.items()}}

    def to_json(self) -> dict:
        return {"sums": self.sums, "count": self.count, "tokens": self.tokens,
                "kinds": self.kinds}


def _tokens(raw: Batch) -> int:
    """Real tokens in this host's batch times the number of hosts (they hold equal shares)."""
    mask = raw.get("attention_mask") if isinstance(raw, Mapping) else None
    return 0 if mask is None else int(np.sum(np.asarray(mask))) * process_count()


def _counted(raw: Batch, prepared: Any) -> int | Mapping[str, Any]:
    """What a step processed: `prepared["tokens"]` ({kind: global count}, device scalars, e.g.
    an online rollout's prompt and generated tokens) when `prepare` reports it, else the real
    tokens of the raw batch (`_tokens`)."""
    if isinstance(prepared, Mapping) and isinstance(prepared.get("tokens"), Mapping):
        return prepared["tokens"]
    return _tokens(raw)


def _host_tokens(counted: int | Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """(total, by kind) of `_counted`'s result on the host."""
    if not isinstance(counted, Mapping):
        return counted, {}
    kinds = {k: int(v) for k, v in jax.device_get(dict(counted)).items()}
    return sum(kinds.values()), kinds


def fit(
    init_state: Callable[[], TrainState],
    train_step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Any]]],
    batches: Iterator,
    *,
    num_steps: int,
    workdir: str,
    checkpointer: Checkpointer,
    abstract_state: TrainState,
    shardings: TrainState,
    prepare: Callable[[TrainState, Any], Any],
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    extra: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    frozen_rest: Callable[[], Any] | None = None,
    flops: ModelFlops | None = None,
    peak_flops: float = 0.0,
) -> TrainState:
    """Train until `state.step == num_steps`; returns the final state.

    init_state: builds the fresh state (called only when the workdir has no checkpoint).
    batches: iterator of host batches with `.state()` / `.restore(dict)` (a `BatchLoader`).
    prepare: `(state, host batch) -> device batch` (e.g. `shard_batch` over the mesh, or an
        online rollout that samples with the current state). perf/tokens_per_sec counts the
        host batch's real tokens, or, when the prepared batch is a mapping with a "tokens"
        entry `{kind: global count}` (online rollouts: every sampled row's prompt tokens and
        its generated tokens), their sum, with perf/<kind>_tokens_per_sec for each kind.
    eval_fn: `state -> metrics`, run every `eval_every` steps (0: only at the end) and logged
        with an `eval/` prefix in the same record as that step's training metrics.
    extra: JSON-serialisable facts stored with every checkpoint (e.g. the config).
    frozen_rest: on resume, builds the frozen part of `state.rest` that the checkpointer leaves
        out (`Checkpointer(frozen=...)`, e.g. a live reference; `state.place_frozen`).
    flops, peak_flops: with them, each log record also has perf/model_flops_per_step and
        perf/mfu against `peak_flops` FLOP/s (> 0); every record has perf/real_tokens_per_sec
        and perf/padding_fraction of the prepared batches (`prefjax.train.efficiency`).
    abstract_state: the restore target; only its shapes and dtypes are read, so pass an abstract
        state (`abstract_state_for`), never a concrete one kept alive beside the restored copy.
    A step whose metrics have `nonfinite` = 1 (its update was skipped by the step) stops the run
    with `NonFiniteLossError`; the checkpoints already written are left untouched.
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    start = checkpointer.latest_step()
    if start is None:
        state, window = init_state(), Window()
    else:
        state, saved = checkpointer.restore(
            start, abstract_state=abstract_state, shardings=shardings,
            frozen_rest=None if frozen_rest is None else frozen_rest())
        batches.restore(saved["data"])
        window = Window(**saved.get("window", {}))
        log.info("resumed from %s at step %d", checkpointer.directory, start)
    # fit's step counts calls of train_step, which may apply several updates (online epochs)
    step = 0 if start is None else start
    writer = MetricsWriter(workdir, resume_step=start)
    bar = ProgressBar(num_steps, initial=step, enabled=progress)
    eval_every = eval_every if eval_every > 0 else num_steps
    efficiency, stats = EfficiencyWindow(flops, peak_flops), None

    def finish(s: int, metrics: Mapping[str, Any], counted, data_pos: dict) -> None:
        nonlocal window
        tokens, kinds = _host_tokens(counted)
        host = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        if host.get("nonfinite", 0.0):
            checkpointer.wait()
            last = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"step {s}: non-finite loss ({host.get('loss')}) or gradient norm "
                f"({host.get('grad_norm')}); the update was skipped and training stopped. "
                f"Last good checkpoint: step {last} in {checkpointer.directory} "
                "(lower the learning rate, check the data, or enable grad clipping; "
                "re-running resumes from it)")
        window.add(host, tokens, kinds)
        efficiency.add(stats)
        bar.update(s, loss=host.get("loss"), tokens=tokens)
        rec = {}
        if s % eval_every == 0 or s == num_steps:
            if eval_fn is not None:
                rec.update({f"eval/{k}": float(v) for k, v in eval_fn(state).items()})
        if s % log_every == 0 or s == num_steps or rec:
            writer.write(s, {**window.means(), **window.perf(), **efficiency.perf(), **rec})
            window = Window()
        checkpointer.save(s, state, extra={**(extra or {}), "data": data_pos,
                                           "window": window.to_json()},
                          metrics=rec or None, force=s == num_steps)

    try:
        pending = None
        while step < num_steps:
            data_pos = batches.state()
            raw = next(batches)
            if pending is not None:
                finish(step, *pending, data_pos)
            prepared = prepare(state, raw)
            stats = batch_stats(prepared)  # read by this step's finish(), one iteration later
            state, metrics = train_step(state, prepared)
            step += 1
            pending = (metrics, _counted(raw, prepared))
        if pending is not None:
            finish(step, *pending, batches.state())
        checkpointer.wait()
    finally:
        bar.close()
        writer.close()
    return state
