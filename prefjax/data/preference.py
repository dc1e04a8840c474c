"""Load preference data (local files, folders or hub names) into normalised, validated datasets.

Formats (detected from the columns, or forced with `format=`), and the columns they normalise to:

  pairwise        `prompt`, `chosen`, `rejected` strings
  hh              Anthropic-HH full transcripts: `chosen`, `rejected` strings only, sharing a prefix
                  that ends at the last "\\n\\nAssistant:"; split into the pairwise columns
  conversational  `chosen`, `rejected` lists of {role, content} messages, with an optional
                  `prompt` (messages or a string, which becomes one user message); without a prompt
                  column the shared leading messages are the prompt. Messages stay messages
                  (rendered with the tokenizer's chat template in `prefjax.data.tokenize`)
  unpaired        `prompt`, `completion`, `label` (KTO-style; label a bool)
  completion      `prompt`, `completion` (SFT data, and MPO's reference samples)
  prompt_only     `prompt` (online algorithms)

For the last three, `prompt`/`completion` may be strings or message lists. Other columns are kept.
The detected format and source are recorded as JSON in `ds.info.description`; read them back
with `dataset_format(ds)` / `dataset_source(ds)`. Row indices in messages count data rows from 0
(for a folder of several files: across the concatenated files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import datasets

log = logging.getLogger(__name__)

FORMATS = ("pairwise", "hh", "conversational", "unpaired", "completion", "prompt_only")
HH_MARKER = "\n\nAssistant:"
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_REQUIRED = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
}
_ERR = "_prefjax_error"


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_preference_data` did: detected format, rows kept, rows skipped and why."""

    source: str
    format: str
    num_rows: int
    skipped: int
    first_errors: tuple[str, ...] = ()
    identical: int = 0  # kept pairs whose chosen equals rejected (see `_count_identical`)


class BadRowError(ValueError):
    """A row failed validation; the message names the source, row index and field."""


def load_preference_data(
    source: str | os.PathLike,
    *,
    split: str = "train",
    data_files: Any = None,
    format: str = "auto",  # noqa: A002 - the public name the spec asks for
    on_bad_row: str = "error",
    cache_dir: str | None = None,
    return_report: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, LoadReport]:
    """Load `source` (.json/.jsonl/.parquet/.csv file, folder, or hub name) and normalise it.

    Raises `BadRowError` on the first bad row when `on_bad_row="error"`; with `"skip"` bad rows are
    dropped, counted in the report and logged once. Returns the dataset (and the report if asked).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    raw = _load_raw(os.fspath(source), split=split, data_files=data_files, cache_dir=cache_dir)
    return prepare_preference_data(
        raw, source=os.fspath(source), format=format, on_bad_row=on_bad_row,
        return_report=return_report,
    )


def prepare_preference_data(
    ds: datasets.Dataset,
    *,
    source: str = "<in-memory dataset>",
    format: str = "auto",  # noqa: A002
    on_bad_row: str = "error",
    return_report: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, LoadReport]:
    """Detect the format of an already loaded dataset, normalise and validate its rows."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fmt = detect_format(ds.column_names, source=source) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    missing = [c for c in _REQUIRED[fmt] if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source}: format {fmt!r} needs columns {list(_REQUIRED[fmt])}; missing {missing} "
            f"(found {ds.column_names})"
        )
    if fmt in ("pairwise", "hh") and _is_messages(ds.features.get("chosen")):
        fmt = "conversational"
    messages = {c: _is_messages(ds.features.get(c)) for c in ("prompt", "completion")}
    fn = _ROW_FNS[fmt]
    has_prompt = "prompt" in ds.column_names

    def normalise(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        out: dict[str, list] = {}
        for j, i in enumerate(indices):
            row = {k: batch[k][j] for k in keys}
            fixed, err = fn(row, messages=messages, has_prompt=has_prompt)
            fixed[_ERR] = "" if err is None else f"{source}: row {i}: {err}"
            for k, v in fixed.items():
                out.setdefault(k, []).append(v)
        return out

    ds = ds.map(normalise, batched=True, with_indices=True, desc=f"validating {fmt} rows")
    errors = [e for e in ds[_ERR] if e]
    if errors and on_bad_row == "error":
        more = f" ({len(errors) - 1} more bad rows; on_bad_row='skip' drops them)"
        raise BadRowError(errors[0] + (more if len(errors) > 1 else ""))
    if errors:
        ds = ds.filter(lambda e: not e, input_columns=[_ERR])
        log.warning("%s: skipped %d bad rows of %d; first: %s",
                    source, len(errors), len(errors) + len(ds), errors[0])
    ds = ds.remove_columns([_ERR])
    identical = _count_identical(ds, fmt, source)
    ds.info.description = json.dumps({"prefjax_format": fmt, "source": source})
    report = LoadReport(source, fmt, len(ds), len(errors), tuple(errors[:5]), identical)
    return (ds, report) if return_report else ds


def _count_identical(ds: datasets.Dataset, fmt: str, source: str) -> int:
    """Pairs with chosen == rejected are kept, as TRL keeps them: their preference term has zero
    gradient (equal log-probs on both sides), though an NLL term on the chosen response (RPO,
    CPO, ORPO) still trains on them; counted in the report and logged once."""
    if fmt not in ("pairwise", "hh", "conversational"):
        return 0
    n = sum(c == r for c, r in zip(ds["chosen"], ds["rejected"]))
    if n:
        log.warning("%s: %d of %d pairs have chosen == rejected; kept (their preference term "
                    "has zero gradient)", source, n, len(ds))
    return n


def dataset_format(ds: datasets.Dataset) -> str:
    """The format recorded by `load_preference_data` / `prepare_preference_data`."""
    return _meta(ds)["prefjax_format"]


def dataset_source(ds: datasets.Dataset) -> str:
    """The source (file, folder or hub name) recorded when `ds` was loaded."""
    return _meta(ds).get("source", "<dataset>")


def detect_format(columns: list[str], *, source: str = "<dataset>") -> str:
    """Pick a format name from the column names (message vs string is decided later)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "pairwise" if "prompt" in cols else "hh"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if {"prompt", "completion"} <= cols:
        return "completion"
    if "prompt" in cols:
        return "prompt_only"
    raise ValueError(
        f"{source}: cannot detect a preference format from columns {sorted(cols)}; expected "
        "prompt/chosen/rejected, chosen/rejected (Anthropic-HH or messages), "
        "prompt/completion/label, prompt/completion, or prompt"
    )


def _meta(ds: datasets.Dataset) -> dict:
    try:
        return json.loads(ds.info.description or "")
    except json.JSONDecodeError as e:
        raise ValueError("dataset was not prepared by prefjax.data.load_preference_data") from e


def _load_raw(source: str, *, split: str, data_files: Any, cache_dir: str | None):
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in _BUILDERS:
            raise ValueError(f"{source}: unsupported file type {ext!r}; expected {list(_BUILDERS)}")
        try:
            return datasets.load_dataset(
                _BUILDERS[ext], data_files={split: source}, split=split, cache_dir=cache_dir
            )
        except datasets.exceptions.DatasetGenerationError as e:
            if ext == ".jsonl" and (where := first_bad_json_line(source)):
                raise ValueError(where) from e
            raise ValueError(f"{source}: cannot be read as {_BUILDERS[ext]} "
                             f"({type(e.__cause__ or e).__name__}: {e.__cause__ or e})") from e
    if os.path.isdir(source):
        return datasets.load_dataset(
            source, split=split, data_files=data_files, cache_dir=cache_dir)
    if ext in _BUILDERS or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such local file or folder")
    offline = datasets.config.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    if offline:
        raise FileNotFoundError(
            f"{source!r} is not a local file or folder, and the Hugging Face Hub is offline "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); download it first or pass a local path"
        )
    try:
        return datasets.load_dataset(
            source, split=split, data_files=data_files, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any hub failure gets the source name attached
        raise RuntimeError(f"could not load hub dataset {source!r} (split {split!r}): {e}") from e


def first_bad_json_line(path: str) -> str | None:
    """`"<path>: line N: ..."` for the first line of a JSON-lines file that is not a JSON object
    (blank lines are allowed), or None when every line parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return (f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno}): "
                        f"{line.strip()[:80]!r}")
            if not isinstance(row, dict):
                return f"{path}: line {n}: expected a JSON object, got {type(row).__name__}"
    return None


def _is_messages(feature: Any) -> bool:
    return isinstance(feature, (datasets.List, datasets.LargeList, list))


# ---- row normalisers: (row, ...) -> (normalised fields, error message or None) ----


def _text(row: dict, field: str, *, what: str = "a non-empty string") -> str | None:
    v = row.get(field)
    if v is None:
        return f"field {field!r} is missing (expected {what})"
    if not isinstance(v, str):
        return f"field {field!r}: expected {what}, got {type(v).__name__} {str(v)[:40]!r}"
    if not v.strip():
        return f"field {field!r} is empty (expected {what})"
    return None


def _msgs(value: Any, field: str) -> tuple[list[dict], str | None]:
    if value is None:
        return [], f"field {field!r} is missing (expected a list of {{role, content}} messages)"
    if not isinstance(value, list) or not value:
        return [], f"field {field!r}: expected a non-empty list of {{role, content}} messages"
    out = []
    for m in value:
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            return [], f"field {field!r}: expected messages with string role and content, got {m!r}"
        out.append({"role": m["role"], "content": m["content"]})
    return out, None


def _pairwise(row, **_):
    fixed = {k: row.get(k) if isinstance(row.get(k), str) else "" for k in _REQUIRED["pairwise"]}
    for field in ("prompt", "chosen", "rejected"):
        what = "a non-empty string" if field == "prompt" else "a non-empty response string"
        if err := _text(row, field, what=what):
            return fixed, err
    return fixed, None


def _hh(row, **_):
    empty = {"prompt": "", "chosen": "", "rejected": ""}
    for field in ("chosen", "rejected"):
        if err := _text(row, field, what="a full transcript string"):
            return empty, err
    c, r = row["chosen"], row["rejected"]
    n = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
    cut = c[:n].rfind(HH_MARKER)
    if cut < 0:
        return empty, (f"field 'rejected': expected both transcripts to share a prompt ending in "
                       f"{HH_MARKER!r}")
    p = c[: cut + len(HH_MARKER)]
    return _pairwise({"prompt": p, "chosen": c[len(p):], "rejected": r[len(p):]})


def _conversational(row, *, has_prompt, **_):
    empty = {"prompt": [], "chosen": [], "rejected": []}
    chosen, err = _msgs(row.get("chosen"), "chosen")
    rejected, err2 = _msgs(row.get("rejected"), "rejected")
    if err or err2:
        return empty, err or err2
    if has_prompt:
        p = row.get("prompt")
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        prompt, err = _msgs(p, "prompt")
        if err:
            return empty, err
        # Datasets like UltraFeedback repeat the prompt inside chosen/rejected: strip it.
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                 min(len(chosen), len(rejected)))
        while n > 0 and (n >= len(chosen) or chosen[n]["role"] != "assistant"):
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            return empty, "field 'chosen': expected leading prompt messages shared with 'rejected'"
    for field, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp or resp[0]["role"] != "assistant" or not resp[-1]["content"].strip():
            return empty, f"field {field!r}: expected a non-empty assistant reply after the prompt"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def _text_or_msgs(row, field, messages, what):
    if messages.get(field):
        v, err = _msgs(row.get(field), field)
        return v, err
    err = _text(row, field, what=what)
    return (row[field] if err is None else ""), err


def _unpaired(row, *, messages, **_):
    fixed, err = _completion(row, messages=messages)
    label = row.get("label")
    if isinstance(label, int) and label in (0, 1):
        label = bool(label)
    if err is None and not isinstance(label, bool):
        err = f"field 'label': expected a boolean (or 0/1), got {label!r}"
    fixed["label"] = label if isinstance(label, bool) else False
    return fixed, err


def _completion(row, *, messages, **_):
    p, err = _text_or_msgs(row, "prompt", messages, "a non-empty string")
    c, err2 = _text_or_msgs(row, "completion", messages, "a non-empty response string")
    return {"prompt": p, "completion": c}, err or err2


def _prompt_only(row, *, messages, **_):
    p, err = _text_or_msgs(row, "prompt", messages, "a non-empty string")
    return {"prompt": p}, err


_ROW_FNS = {
    "pairwise": _pairwise,
    "hh": _hh,
    "conversational": _conversational,
    "unpaired": _unpaired,
    "completion": _completion,
    "prompt_only": _prompt_only,
}
