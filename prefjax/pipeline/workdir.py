"""A run's workdir config: `config.json` is written once, and a resumed run may change only
fields that leave the training math alone (its schedule of logging, evaluation, checkpoints)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.paths import as_path

# Fields a resumed run may change: when to log, evaluate, save, what to keep and export, how
# long to run. They change no number of the steps already taken or still to come.
SCHEDULE_FIELDS = frozenset({
    "train.num_steps", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.best_metric", "train.export_hf", "reference.cache",
    "train.checkpoint_write_gb",
})


def flat(d: Mapping, prefix: str = "") -> dict:
    """`{"a.b": v}` of a nested mapping."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def math_fields(before: Mapping, now: Mapping) -> tuple[list[str], list[str]]:
    """`(refused, allowed)`: changed fields of two flat configs, split by whether a resumed run
    may take them. `train.num_steps` changes the math under a cosine schedule (its length is the
    decay horizon), so it is refused there. A field the earlier run did not have (a newer
    prefjax added it) is no change when it holds its default."""
    from prefjax.config import base_config

    defaults = flat(json.loads(base_config().to_json_best_effort()))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                     and not (k not in before and k in defaults and now.get(k) == defaults[k]))
    allowed = set(SCHEDULE_FIELDS)
    if "cosine" in (before.get("train.schedule"), now.get("train.schedule")):
        allowed.discard("train.num_steps")
    return [k for k in changed if k not in allowed], [k for k in changed if k in allowed]


def write_config(c: ConfigDict, workdir: str | Path) -> None:
    """Write `workdir/config.json`; a workdir that ran another config is refused, naming the
    fields that change the math, unless only schedule fields (`SCHEDULE_FIELDS`) differ: then the
    new values are recorded and the run resumes with them (e.g. a larger `train.num_steps`
    extends a finished run)."""
    path = as_path(workdir) / "config.json"
    now = json.loads(c.to_json_best_effort())
    if path.exists():
        before = json.loads(path.read_text())
        refused, allowed = math_fields(flat(before), flat(now))
        if refused:
            b, n = flat(before), flat(now)
            diff = ", ".join(f"{k}: {b.get(k)!r} -> {n.get(k)!r}" for k in refused)
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {refused}: {diff}); "
                "these change the training math, so the run cannot resume with them. Use a new "
                "workdir, or delete it to start over (re-running the same config resumes; "
                f"schedule fields {sorted(SCHEDULE_FIELDS)} may change)")
        if not allowed:
            return
    if parallel.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2, sort_keys=True))
