"""Rows -> token ids (chat templates, truncation policy) and token ids -> padded int32 batches.

String rows: prompt ids are the tokenizer's BOS prefix (whatever `tokenizer("")` adds, EOS excluded)
plus the prompt's tokens; each response is tokenized separately (no special tokens) and EOS is
appended. Message rows are rendered with the tokenizer's chat template: the prompt with
`add_generation_prompt=True`, the response as the text the full conversation adds after it (the
template's own end-of-turn tokens stay; EOS is appended only when the reply has none).

Truncation (`over_long="truncate"`): a prompt over `max_prompt_length` keeps its END (and its BOS
prefix); a response over `max_response_length` keeps its start; if prompt + longest response still
exceeds `max_length`, responses are cut to fit, and a prompt that alone leaves no room for one
response token is first cut (keeping its end) to `max_length - 1`. `"drop"` drops such rows, and
`"error"` raises naming the source, row and field. Counts go into a `TokenizeReport`, logged once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from prefjax.data.preference import dataset_source

log = logging.getLogger(__name__)

OVER_LONG = ("truncate", "drop", "error")
RESPONSE_KEYS = ("chosen", "rejected", "completion")


@dataclasses.dataclass(frozen=True)
class TruncationPolicy:
    """Length limits in tokens (None = no limit) and what to do with rows over them."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    over_long: str = "truncate"

    def __post_init__(self):
        if self.over_long not in OVER_LONG:
            raise ValueError(f"over_long must be one of {OVER_LONG}, got {self.over_long!r}")
        for name, low in (("max_length", 2), ("max_prompt_length", 1), ("max_response_length", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be None or an int >= {low}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TokenizeReport:
    """Counts from one `tokenize_dataset` call (truncated_responses counts each response)."""

    source: str
    rows: int
    truncated_prompts: int
    truncated_responses: int
    dropped: int
    first_dropped: str = ""


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. [bos] for Llama, [] for GPT-2)."""
    return [i for i in tokenizer("", add_special_tokens=True)["input_ids"]
            if i != tokenizer.eos_token_id]


def encode_row(row: Mapping[str, Any], tokenizer, *, prefix: list[int] | None = None) -> dict:
    """Untruncated ids of a normalised row: `prompt_ids` and `<response>_ids` for each response."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set one so responses can be terminated")
    keys = [k for k in RESPONSE_KEYS if k in row]
    values = [row["prompt"]] + [row[k] for k in keys]
    if not any(isinstance(v, list) for v in values):
        prefix = bos_prefix(tokenizer) if prefix is None else prefix
        out = {"prompt_ids": prefix + _ids(tokenizer, row["prompt"])}
        for k in keys:
            out[f"{k}_ids"] = _ids(tokenizer, row[k]) + [tokenizer.eos_token_id]
        return out
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("row holds chat messages but the tokenizer has no chat_template")
    prompt = _as_messages(row["prompt"], "user")
    p_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = {"prompt_ids": _ids(tokenizer, p_text)}
    for k in keys:
        full = tokenizer.apply_chat_template(prompt + _as_messages(row[k], "assistant"),
                                             tokenize=False)
        if not full.startswith(p_text):
            raise ValueError(f"field {k!r}: the chat template's rendering of prompt + reply does "
                             "not start with its rendering of the prompt; cannot split them")
        ids = _ids(tokenizer, full[len(p_text):])
        out[f"{k}_ids"] = ids if tokenizer.eos_token_id in ids else ids + [tokenizer.eos_token_id]
    return out


def apply_policy(ids: dict, policy: TruncationPolicy, *, prefix: Sequence[int] = ()):
    """Apply `policy` to one row's ids -> (ids, truncated prompts, truncated responses, problem).

    `problem` is None, or (for "drop"/"error") a message naming the field over its limit.
    """
    p = list(ids["prompt_ids"])
    resp = {k: list(v) for k, v in ids.items() if k != "prompt_ids"}
    longest = max((len(v) for v in resp.values()), default=0)
    top = max(resp, key=lambda k: len(resp[k]))[:-4] if resp else "response"
    checks = [("prompt", len(p), policy.max_prompt_length, "max_prompt_length")]
    checks += [(k[:-4], len(v), policy.max_response_length, "max_response_length")
               for k, v in resp.items()]
    checks += [(f"prompt + {top}", len(p) + longest, policy.max_length, "max_length")]
    if policy.over_long != "truncate":
        for field, n, limit, name in checks:
            if limit is not None and n > limit:
                return ids, 0, 0, f"field {field!r}: {n} tokens, expected at most {limit} ({name})"
        return ids, 0, 0, None
    tp, tr = 0, 0
    mpl, mrl, ml = policy.max_prompt_length, policy.max_response_length, policy.max_length
    if mpl is not None and len(p) > mpl:
        p, tp = _keep_end(p, mpl, prefix), 1
    if ml is not None and len(p) > ml - 1:
        p, tp = _keep_end(p, ml - 1, prefix), 1
    cap = min(x for x in (mrl, None if ml is None else ml - len(p), 1 << 62) if x is not None)
    for k, v in resp.items():
        if len(v) > cap:
            resp[k], tr = v[:cap], tr + 1
    return {"prompt_ids": p, **resp}, tp, tr, None


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    over_long: str = "truncate",
    source: str | None = None,
) -> tuple[datasets.Dataset, TokenizeReport]:
    """Add `prompt_ids` (+ `chosen_ids`/`rejected_ids` or `completion_ids`) columns to `ds`."""
    policy = TruncationPolicy(max_length, max_prompt_length, max_response_length, over_long)
    if source is None:
        try:
            source = dataset_source(ds)
        except ValueError:
            source = "<dataset>"
    prefix = bos_prefix(tokenizer)

    def fn(row: dict, i: int) -> dict:
        try:
            ids = encode_row(row, tokenizer, prefix=prefix)
        except ValueError as e:
            raise ValueError(f"{source}: row {i}: {e}") from e
        if not ids["prompt_ids"]:
            raise ValueError(f"{source}: row {i}: field 'prompt' has no tokens; position 0 is "
                             "never scored, so a prompt (or BOS) token is required")
        ids, tp, tr, problem = apply_policy(ids, policy, prefix=prefix)
        msg = "" if problem is None else f"{source}: row {i}: {problem}"
        if msg and policy.over_long == "error":
            raise ValueError(msg + " (over_long='error')")
        return {**ids, "_tp": tp, "_tr": tr, "_drop": msg}

    out = ds.map(fn, with_indices=True, desc="tokenizing")
    drops = [m for m in out["_drop"] if m]
    if drops:
        out = out.filter(lambda m: not m, input_columns=["_drop"])
    report = TokenizeReport(source, len(ds), int(np.sum(np.asarray(out["_tp"], np.int64))),
                            int(np.sum(np.asarray(out["_tr"], np.int64))), len(drops),
                            drops[0] if drops else "")
    out = out.remove_columns(["_tp", "_tr", "_drop"])
    level = logging.WARNING if (drops or report.truncated_prompts
                                or report.truncated_responses) else logging.INFO
    log.log(level, "%s: tokenized %d rows; truncated %d prompts, %d responses; dropped %d%s",
            source, report.rows, report.truncated_prompts, report.truncated_responses,
            report.dropped, f" (first: {drops[0]})" if drops else "")
    return out, report


# ---- collation: lists of token ids -> fixed-shape int32 batches (prefjax/typing.py layout) ----


def collate_pairs(rows: Sequence[Mapping], *, pad_id: int, seq_len: int | Sequence[int]) -> dict:
    """Pairs -> right-padded `[2n, t]` batch: rows [:n] prompt+chosen, [n:2n] prompt+rejected.

    Keys: input_ids, attention_mask, loss_mask (int32 [2n, t]; loss_mask 1 on response tokens),
    and ref_logps (float32 [2n]) when rows carry `ref_chosen_logps` / `ref_rejected_logps`.
    `seq_len` is a fixed length or a list of buckets (the smallest that fits is used).
    """
    parts = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    parts += [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    out = _right_pad(parts, pad_id, seq_len)
    if rows and "ref_chosen_logps" in rows[0]:
        ref = [_ref(r, "ref_chosen_logps") for r in rows] + [
            _ref(r, "ref_rejected_logps") for r in rows]
        out["ref_logps"] = np.asarray(ref, np.float32)
    return out


def collate_sequences(rows: Sequence[Mapping], *, pad_id: int,
                      seq_len: int | Sequence[int]) -> dict:
    """Single prompt+completion rows -> right-padded `[n, t]` batch with a completion loss mask.

    Carries ref_logps (float32 [n]) when rows have a `ref_logps` column.
    """
    out = _right_pad([(r["prompt_ids"], r["completion_ids"]) for r in rows], pad_id, seq_len)
    if rows and "ref_logps" in rows[0]:
        out["ref_logps"] = np.asarray([_ref(r, "ref_logps") for r in rows], np.float32)
    return out


def collate_prompts(rows: Sequence[Mapping], *, pad_id: int,
                    seq_len: int | Sequence[int]) -> dict:
    """Prompts -> LEFT-padded `[n, t]` input_ids / attention_mask, ready for sampling."""
    lens = [len(r["prompt_ids"]) for r in rows]
    t = _pick_len(seq_len, max(lens, default=0))
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for b, r in enumerate(rows):
        n = lens[b]
        if n:
            ids[b, t - n:] = r["prompt_ids"]
            mask[b, t - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _right_pad(parts, pad_id: int, seq_len) -> dict:
    t = _pick_len(seq_len, max((len(p) + len(c) for p, c in parts), default=0))
    ids = np.full((len(parts), t), pad_id, np.int32)
    attn = np.zeros((len(parts), t), np.int32)
    loss = np.zeros((len(parts), t), np.int32)
    for b, (p, c) in enumerate(parts):
        if not len(p):
            raise ValueError(f"batch row {b}: empty prompt_ids; position 0 is never scored, so "
                             "every sequence needs at least one prompt (or BOS) token")
        n = len(p) + len(c)
        ids[b, :n] = list(p) + list(c)
        attn[b, :n] = 1
        loss[b, len(p):n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _pick_len(seq_len: int | Sequence[int], need: int) -> int:
    buckets = sorted([seq_len] if isinstance(seq_len, int) else seq_len)
    for t in buckets:
        if t >= need:
            return int(t)
    raise ValueError(f"a batch row has {need} tokens but seq_len allows at most {buckets[-1]}; "
                     "tokenize with max_length <= seq_len or raise seq_len")


def _ref(row: Mapping, key: str) -> float:
    if row.get(key) is None:
        raise ValueError(f"a row lacks {key!r} while others in the batch have it")
    return float(row[key])


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _keep_end(p: list[int], n: int, prefix: Sequence[int]) -> list[int]:
    k = len(prefix)
    if k and n > k and p[:k] == list(prefix):
        return p[:k] + p[len(p) - (n - k):]
    return p[len(p) - n:]
