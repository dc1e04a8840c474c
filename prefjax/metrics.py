"""Metrics sinks: `workdir/metrics.jsonl` (always), TensorBoard (if importable), progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from prefjax.parallel import is_main_process
from prefjax.paths import as_path, is_remote

FILENAME = "metrics.jsonl"


def _scalar(v: Any) -> Any:
    """JSON-friendly value: arrays/np scalars -> float/int, NaN/inf -> strings JSON can hold."""
    if isinstance(v, str | bool) or v is None:
        return v
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return int(v)
    x = float(np.asarray(v))
    return x if math.isfinite(x) else str(x)  # "nan", "inf", "-inf" (json.loads keeps them str)


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of `workdir/metrics.jsonl` in order (empty list when there is no file)."""
    path = as_path(workdir) / FILENAME
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # a last line cut by a crash mid-write
            raise ValueError(f"{path}:{i} is not valid JSON: {e}") from e
    return out


def _truncate(path: Path, resume_step: int | None) -> None:
    """Keep only records a run resumed from `resume_step` would not write again."""
    if not path.exists():
        return
    if resume_step is None:
        path.write_text("")
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
        if int(rec.get("step", -1)) <= resume_step:
            keep.append(line + "\n")
    if is_remote(path):  # object stores replace whole objects atomically
        path.write_text("".join(keep))
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _tensorboard_writer(logdir: Path, mode: str | bool):
    if mode is False or mode == "off":
        return None
    try:
        from tensorboardX import SummaryWriter

        w = SummaryWriter(str(logdir))
        return w.add_scalar, w
    except ImportError:
        pass
    try:
        from flax.metrics import tensorboard  # needs tensorflow

        w = tensorboard.SummaryWriter(str(logdir))
        return w.scalar, w
    except ImportError:
        pass
    if mode is True:
        raise ImportError(
            "use_tensorboard=True but neither tensorboardX nor tensorflow is installed; "
            "install one or use use_tensorboard='auto'")
    return None


class MetricsWriter:
    """Append `{"step": s, **metrics}` lines to `workdir/metrics.jsonl`, flushed every write.

    resume_step: the step the run continues from (the restored checkpoint's step): records with
    a larger step are dropped first, so a resumed run's file equals an uninterrupted run's.
    None means a fresh run: the file starts empty. Only the main process writes.
    use_tensorboard: "auto" (if tensorboardX or tensorflow imports), True (required), False.
    """

    def __init__(self, workdir: str | Path, *, resume_step: int | None = None,
                 use_tensorboard: str | bool = "auto"):
        self.path = as_path(workdir) / FILENAME
        self.enabled = is_main_process()
        self._file = self._tb = None
        self._lines: list[str] | None = None  # remote files: rewritten whole (no append)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # TensorBoard first: a missing required backend fails before the file is touched.
        self._tb = _tensorboard_writer(self.path.parent / "tensorboard", use_tensorboard)
        _truncate(self.path, resume_step)
        if is_remote(self.path):
            self._lines = self.path.read_text().splitlines(keepends=True)
        else:
            self._file = self.path.open("a")

    def write(self, step: int, metrics: dict[str, Any]) -> dict:
        """Write one record; returns it (floats) for printing."""
        rec = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return rec
        if self._lines is not None:
            self._lines.append(json.dumps(rec) + "\n")
            self.path.write_text("".join(self._lines))
        else:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if self._tb is not None:
            add_scalar, writer = self._tb
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float):
                    add_scalar(k, v, step)
            writer.flush()
        return rec

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb[1].close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar:
    """tqdm bar with step, loss, tokens/s and ETA; silent off a TTY or off the main process."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool | None = None,
                 stream=None):
        stream = stream or sys.stderr
        if enabled is None:
            enabled = is_main_process() and hasattr(stream, "isatty") and stream.isatty()
        self.enabled = bool(enabled)
        self._bar = None
        self._t0, self._tokens = time.perf_counter(), 0
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=stream, dynamic_ncols=True,
                             unit="step")

    def update(self, step: int, *, loss: float | None = None, tokens: int = 0) -> None:
        """Advance to `step`; `tokens` processed since the last update feed the tokens/s rate."""
        self._tokens += int(tokens)
        if self._bar is None:
            return
        post = {}
        if loss is not None:
            post["loss"] = f"{float(loss):.4f}"
        dt = time.perf_counter() - self._t0
        if self._tokens and dt > 0:
            post["tok/s"] = f"{self._tokens / dt:.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
