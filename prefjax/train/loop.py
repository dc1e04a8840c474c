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
from prefjax.train.state import TrainState

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient; the update was not applied."""


class Window:
    """Running sums of step metrics between two log records (JSON-serialisable for resume)."""

    def __init__(self, sums: Mapping[str, float] | None = None, count: int = 0,
                 tokens: int = 0):
        self.sums, self.count, self.tokens = dict(sums or {}), count, tokens
        self.t0 = time.perf_counter()

    def add(self, metrics: Mapping[str, float], tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        out = {k: v / self.count for k, v in self.sums.items()}
        out.pop("nonfinite", None)  # always 0 in a logged window: a non-finite step stops the run
        return out

    def perf(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"perf/steps_per_sec": self.count / dt, "perf/tokens_per_sec": self.tokens / dt}

    def to_json(self) -> dict:
        return {"sums": self.sums, "count": self.count, "tokens": self.tokens}


def _tokens(raw: Batch) -> int:
    """Real tokens in this host's batch times the number of hosts (they hold equal shares)."""
    mask = raw.get("attention_mask") if isinstance(raw, Mapping) else None
    return 0 if mask is None else int(np.sum(np.asarray(mask))) * process_count()


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
) -> TrainState:
    """Train until `state.step == num_steps`; returns the final state.

    init_state: builds the fresh state (called only when the workdir has no checkpoint).
    batches: iterator of host batches with `.state()` / `.restore(dict)` (a `BatchLoader`).
    prepare: `(state, host batch) -> device batch` (e.g. `shard_batch` over the mesh, or an
        online rollout that samples with the current state).
    eval_fn: `state -> metrics`, run every `eval_every` steps (0: only at the end) and logged
        with an `eval/` prefix in the same record as that step's training metrics.
    extra: JSON-serialisable facts stored with every checkpoint (e.g. the config).
    frozen_rest: on resume, builds the frozen part of `state.rest` that the checkpointer leaves
        out (`Checkpointer(frozen=...)`, e.g. a live reference; `state.place_frozen`).
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

    def finish(s: int, metrics: Mapping[str, Any], tokens: int, data_pos: dict) -> None:
        nonlocal window
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
        window.add(host, tokens)
        bar.update(s, loss=host.get("loss"), tokens=tokens)
        rec = {}
        if s % eval_every == 0 or s == num_steps:
            if eval_fn is not None:
                rec.update({f"eval/{k}": float(v) for k, v in eval_fn(state).items()})
        if s % log_every == 0 or s == num_steps or rec:
            writer.write(s, {**window.means(), **window.perf(), **rec})
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
            state, metrics = train_step(state, prepare(state, raw))
            step += 1
            pending = (metrics, _tokens(raw))
        if pending is not None:
            finish(step, *pending, batches.state())
        checkpointer.wait()
    finally:
        bar.close()
        writer.close()
    return state
