"""DPO on a Qwen2.5-0.5B-shaped checkpoint, prefjax vs HF TRL: peak resident memory, s/step, load.

What it builds (cached in `--workdir`, default benchmarks/.real_scale/<shape>/, git-ignored):
  model/   `Qwen2ForCausalLM` with random weights (hidden 896, 24 layers, 14 heads / 2 kv, mlp
           4864, vocab 151936, tied embeddings, qkv bias), cast to bf16 and written by
           `save_pretrained(max_shard_size=...)` as 4 safetensors shards + index, exactly as hub
           checkpoints come; plus a real tokenizer: Mistral's SentencePiece v1 model shipped in
           the `mistral-common` wheel, saved as `tokenizer.json` (32000 tokens < 151936: every id
           is in range of the embedding)
  data/    train.jsonl (24 pairs) and eval.jsonl (8 pairs) in Anthropic-HH format (`chosen` /
           `rejected` transcripts sharing a prompt that ends at the last "\\n\\nAssistant:"),
           English sentences drawn from the docstrings of Python's standard library, long
           enough that every row fills `--seq` 256 tokens on both sides: every prompt is more
           than 128 tokens and less than 256, every response more than 128 tokens
The builder needs torch, transformers, sentencepiece and protobuf; it runs in TRL's environment
(benchmarks/.venv-trl: `make bench-trl-env`, then
`benchmarks/.venv-trl/bin/pip install mistral-common sentencepiece protobuf`).

What it runs, one process at a time, each under a watchdog (below):
  trl_f32        benchmarks/trl_real_scale.py in benchmarks/.venv-trl: `DPOTrainer` on the same
                 folder and jsonl, precomputed reference log-probs (train + eval rows), gradient
                 checkpointing, float32 weights, moments and compute, `max_length` 256
  trl_bf16       the same with `bf16=True` (float32 master weights, bf16 autocast): the setup of
                 issue 14's 8.8 GB figure
  pj_load        prefjax's `load_hf` of the folder alone (float32), for the load seconds
  pj_f32         `python -m prefjax.main --config=configs/dpo_hh.py` with the model / data paths,
                 lengths 256 = 128 prompt + 128 response, batch 8 pairs, `--steps` steps, float32
                 compute, export off; one CPU device
  pj_f32_fsdp8   the same on 8 simulated CPU devices (XLA_FLAGS=
                 --xla_force_host_platform_device_count=8) with `--config.mesh.fsdp=8`
  pj_f32_bf16m   pj_f32 with `--config.train.moment_dtype=bfloat16` (bf16 AdamW moments)
  pj_bf16        pj_f32 with bf16 compute (`--config.model.dtype=bfloat16`: issue 14's setup)
  pj_f32_lora    `--config=configs/dpo_lora_hh.py` (pj_f32's flags): LoRA rank 16, alpha 32 on
                 every attention and MLP projection, the live reference = the base with the
                 adapters off (one model in memory), AdamW state for the adapters only
  trl_f32_lora   trl_f32 with a PEFT `LoraConfig` of the same rank, alpha and targets
                 ("all-linear"), no precomputed reference: TRL's reference is then the base with
                 the adapters disabled, as prefjax's (peft in benchmarks/.venv-trl)
`--pj-extra` appends config overrides to every prefjax run (e.g. `--config.model.attention=...`).

Figures (every definition is in the JSON's `definitions` too):
  peak RSS       the largest resident set of the run's process tree (psutil, summed over the
                 child and its descendants, polled every 0.5 s), and the kernel's own
                 high-water mark of the child (`wait4` ru_maxrss, exact but per process).
                 `peak_rss_train` is the polled peak up to the moment the last step's metrics
                 record appeared: everything but prefjax's final checkpoint write
  s/step         prefjax: 1 / `perf/steps_per_sec` of metrics.jsonl written every step
                 (`log_every=1`), median over steps 2 .. steps-1 (step 1 compiles, the last one
                 also evaluates); TRL: gaps between `on_step_end` callbacks, median after
                 `--trl-warmup` steps
  load s         prefjax: `load_hf(folder)` alone, imports excluded (run pj_load); TRL:
                 `AutoModelForCausalLM.from_pretrained(folder, dtype=float32)`
  reference s    prefjax: from the log line of the last tokenized split to the last "added
                 reference log-probs" line, minus pj_load's load seconds (prefjax logs no line
                 between loading the weights and the reference pass); TRL: the time inside its
                 `_precompute_ref_logps` (train + eval rows)
Targets (issue 14): at equal precision (float32 weights, moments, compute) prefjax's peak RSS
<= TRL's (trl_f32); with bf16 moments <= 0.75x TRL's; step time <= TRL's at equal compute dtype.

Watchdog: every run is a child in its own session; its tree's RSS is polled every 0.5 s and the
whole group is SIGKILLed above `--rss-limit` GB (the machine is shared: 24 GiB for everyone) or
past `--run-timeout` seconds. Such a run is recorded as "killed at X GB" (or timed out), with
whatever figures it produced before.

    .venv/bin/python benchmarks/real_scale.py                                  # full shape
    .venv/bin/python benchmarks/real_scale.py --layers 2 --vocab 32000 --runs pj_f32,pj_f32_fsdp8
    .venv/bin/python benchmarks/real_scale.py --runs trl_f32,trl_bf16          # one side only
    .venv/bin/python benchmarks/real_scale.py --report-only                    # table from records

Each run's record is kept in <workdir>/<shape>/records/<run>.json; the JSON written to `--out`
holds the records of `--runs` (those run now, and with `--report-only` or `--reuse` earlier ones,
each with its own start time and load average).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_PY = HERE / ".venv-trl" / "bin" / "python"
PJ_PY = Path(sys.executable)
GB = 1e9
RUNS = ("trl_f32", "trl_bf16", "pj_load", "pj_f32", "pj_f32_fsdp8", "pj_f32_bf16m", "pj_bf16",
        "pj_f32_lora", "trl_f32_lora")
LORA = dict(rank=16, alpha=32.0)  # both sides; every attention and MLP projection
DEFAULT_RUNS = "trl_f32,trl_bf16,pj_load,pj_f32,pj_f32_fsdp8,pj_f32_bf16m"
HH = "\n\nAssistant:"
EXAMPLE = "The tokenizer's café costs 12.50 dollars."
# Modules whose docstrings give the text: ordinary technical English prose.
CORPUS_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "glob", "gzip", "heapq", "http.client",
    "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox",
    "multiprocessing", "optparse", "os", "pathlib", "pickle", "pydoc", "queue", "random", "re",
    "sched", "selectors", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tkinter",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "zipfile",
)
QUESTIONS = (
    "Can you explain what this means in practice?", "How would you use this in a project?",
    "What should I watch out for?", "Is there a simpler way to think about it?",
    "Why does it work like that?", "What is the most common mistake here?",
)


# --------------------------------------------------------------------------- arguments


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(HERE / ".real_scale"),
                   help="cache of checkpoints, data, run folders and records")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--shards", type=int, default=4, help="safetensors shards to write")
    p.add_argument("--pairs", type=int, default=24, help="training pairs")
    p.add_argument("--eval-pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="max_length (prompt + response)")
    p.add_argument("--prompt-len", type=int, default=128, help="prefjax max_prompt_length")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=5,
                   help="prefjax steps (timed: 2 .. steps-1); TRL runs steps-1 steps")
    p.add_argument("--trl-warmup", type=int, default=1, help="TRL steps left out of the median")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--pj-extra", default="", help="extra --config.x=y flags for prefjax runs")
    p.add_argument("--rss-limit", type=float, default=12.0, help="GB; above it a run is killed")
    p.add_argument("--reuse-reference", action="store_true",
                   help="prefjax runs start from the reference log-prob cache of an earlier run "
                        "(runs/_ref_logps; its reference s is then the cache read)")
    p.add_argument("--run-timeout", type=float, default=1500.0, help="seconds per run")
    p.add_argument("--reuse", action="store_true",
                   help="skip runs that already have a record for this shape")
    p.add_argument("--report-only", action="store_true", help="table + JSON from the records")
    p.add_argument("--build-only", action="store_true", help="build checkpoint and data, stop")
    p.add_argument("--build-here", action="store_true", help=argparse.SUPPRESS)  # TRL env's side
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                   "real_scale.json for the full shape, <workdir>/<shape>/real_scale.json else)")
    a = p.parse_args(argv)
    a.runs = [r for r in a.runs.split(",") if r]
    bad = sorted(set(a.runs) - set(RUNS))
    if bad:
        p.error(f"unknown runs {bad}; choose from {list(RUNS)}")
    if a.steps < 3:
        p.error(f"--steps must be >= 3 (step 1 compiles, the last evaluates), got {a.steps}")
    if a.steps - 1 <= a.trl_warmup:
        p.error("--trl-warmup must leave at least one timed TRL step (TRL runs steps-1)")
    return a


def full_shape(a) -> bool:
    return (a.layers, a.vocab, a.hidden, a.heads, a.kv_heads, a.intermediate) == (
        24, 151936, 896, 14, 2, 4864)


def shape_tag(a) -> str:
    if full_shape(a):
        return "qwen2.5-0.5b"
    return (f"qwen2-d{a.hidden}-l{a.layers}-h{a.heads}-kv{a.kv_heads}-f{a.intermediate}"
            f"-v{a.vocab}")


def paths(a) -> dict[str, Path]:
    base = Path(a.workdir).resolve() / shape_tag(a)
    return dict(base=base, model=base / "model", data=base / "data", runs=base / "runs",
                records=base / "records", train=base / "data" / "train.jsonl",
                eval=base / "data" / "eval.jsonl")


# --------------------------------------------------------------------------- builder
# Runs in TRL's environment (torch, transformers, sentencepiece): `--build-only`.


def english_sentences() -> list[str]:
    """Sentences of ordinary prose from standard-library docstrings, sorted (deterministic)."""
    import importlib
    import inspect

    seen: set[str] = set()
    for name in CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [v for v in vars(mod).values() if callable(v) or inspect.isclass(v)]
        for obj in objs:
            try:
                doc = inspect.getdoc(obj) or ""
            except Exception:  # noqa: BLE001 (some objects raise on attribute access)
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = s.split()
                letters = sum(ch.isalpha() or ch in " ,.'" for ch in s)
                if (8 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?"
                        and letters >= 0.93 * len(s) and "e.g" not in s and "i.e" not in s):
                    seen.add(s)
    return sorted(seen)


def make_rows(sentences: list[str], tokenizer, n: int, seed: int, *, prompt_min: int,
              prompt_max: int, response_min: int) -> list[dict]:
    """`n` HH rows whose prompt has prompt_min < tokens < prompt_max and whose responses have
    more than response_min tokens each (counts without BOS / EOS)."""
    import random

    rng = random.Random(seed)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    def para(lo: int) -> str:
        out: list[str] = []
        while count(" ".join(out)) <= lo:
            out.append(rng.choice(sentences))
        return " ".join(out)

    rows = []
    while len(rows) < n:
        first = f"{rng.choice(sentences)} {rng.choice(QUESTIONS)}"
        prompt = (f"\n\nHuman: {first}{HH} {para(prompt_min // 2)}\n\nHuman: "
                  f"{rng.choice(sentences)} {rng.choice(QUESTIONS)}{HH}")
        if not prompt_min < count(prompt) < prompt_max:
            continue
        rows.append(dict(chosen=prompt + " " + para(response_min),
                         rejected=prompt + " " + para(response_min)))
    return rows


def byte_to_char() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2 / Qwen2): printable bytes map to themselves, the rest
    to the code points from 256 upwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def qwen2_tokenizer(sentencepiece_json: dict):
    """Mistral's SentencePiece BPE (a `tokenizer.json` dict) as a `Qwen2Tokenizer`.

    transformers 5 loads every qwen2 folder with `Qwen2Tokenizer`, which rebuilds a byte-level
    pipeline (Qwen's pre-split regex + ByteLevel) around the vocabulary and merges it finds: a
    SentencePiece vocabulary ("\u2581the", "<0xC3>") would then lose its spaces and bytes. So the
    vocabulary and merges are rewritten in the byte-level alphabet ("\u2581" -> the space's
    char, "<0xHH>" -> that byte's char); a string that appears twice (a byte token and the same
    single character) keeps its first id. Special tokens: <unk>, </s> as EOS and pad, no BOS
    (like Qwen2's own tokenizer).
    """
    from transformers import Qwen2Tokenizer

    b2c = byte_to_char()
    specials = {"<unk>", "<s>", "</s>"}

    def conv(t: str) -> str:
        if t in specials:
            return t
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", t)
        if m:
            return b2c[int(m.group(1), 16)]
        return "".join(b2c[b] for b in t.replace("\u2581", " ").encode("utf-8"))

    vocab: dict[str, int] = {}
    for t, i in sorted(sentencepiece_json["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(conv(t), i)
    merges = [(conv(m[0]), conv(m[1])) if isinstance(m, list) else tuple(map(conv, m.split(" ")))
              for m in sentencepiece_json["model"]["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token=None,
                          eos_token="</s>", pad_token="</s>")


def build(a) -> dict:
    """Write the checkpoint folder (bf16 shards + index + tokenizer) and the two jsonl files."""
    import mistral_common
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    p = paths(a)
    t0 = time.perf_counter()
    src_dir = p["base"] / "tokenizer_src"
    src_dir.mkdir(parents=True, exist_ok=True)
    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copyfile(src, src_dir / "tokenizer.model")
    (src_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, legacy=False)))
    sp = AutoTokenizer.from_pretrained(str(src_dir))  # SentencePiece -> tokenizers (needs spm)
    sp_dir = p["base"] / "tokenizer_json"
    sp.save_pretrained(str(sp_dir))
    tok = qwen2_tokenizer(json.loads((sp_dir / "tokenizer.json").read_text()))

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=32768,
                      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      use_sliding_window=False, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(t.numel() for t in model.parameters())
    total = sum(t.numel() * t.element_size() for t in model.parameters())  # tied: counted once
    shard = "300MB" if full_shape(a) else f"{math.ceil(total / a.shards / 1e6) + 1}MB"
    tmp = p["model"].with_name("model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size=shard)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(p["model"], ignore_errors=True)
    tmp.rename(p["model"])
    del model

    sentences = english_sentences()
    kw = dict(prompt_min=a.prompt_len, prompt_max=a.seq - 32, response_min=a.seq - a.prompt_len)
    p["data"].mkdir(parents=True, exist_ok=True)
    for path, n, seed in ((p["train"], a.pairs, 1), (p["eval"], a.eval_pairs, 2)):
        rows = make_rows(sentences, tok, n, seed, **kw)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = sorted(f.name for f in p["model"].glob("*.safetensors"))
    info = dict(params=n_params, bf16_bytes=total, shards=shards, max_shard_size=shard,
                tokenizer=f"mistral-common {mistral_common.__version__} tokenizer.model.v1 as "
                          "a byte-level Qwen2Tokenizer",
                tokenizer_vocab=len(tok), tokenizer_max_id=max(tok.get_vocab().values()),
                example=tok.convert_ids_to_tokens(tok(EXAMPLE)["input_ids"]),
                corpus_sentences=len(sentences),
                build_s=time.perf_counter() - t0)
    (p["base"] / "build.json").write_text(json.dumps(info, indent=2))
    return info


def ensure_built(a) -> dict:
    p = paths(a)
    info = p["base"] / "build.json"
    if info.exists() and (p["model"] / "config.json").exists() and p["eval"].exists():
        return json.loads(info.read_text())
    if not TRL_PY.exists():
        raise SystemExit(f"{TRL_PY} is missing: the builder needs torch + transformers + "
                         "sentencepiece; run `make bench-trl-env` and `benchmarks/.venv-trl/bin/"
                         "pip install mistral-common sentencepiece protobuf`")
    print(f"building {p['base']} ...", flush=True)
    cmd = [str(TRL_PY), str(Path(__file__).resolve()), "--build-here", "--workdir", a.workdir,
           *[f"--{k}={getattr(a, k.replace('-', '_'))}" for k in (
               "layers", "vocab", "hidden", "heads", "kv-heads", "intermediate", "shards",
               "pairs", "eval-pairs", "seq", "prompt-len")]]
    rec = watched(cmd, log=p["base"] / "build.log", limit_gb=a.rss_limit, timeout=1800,
                  env=dict(os.environ))
    if rec["status"] != "ok":
        raise SystemExit(f"building failed ({rec['status']}); see {p['base'] / 'build.log'}")
    return json.loads(info.read_text())


# --------------------------------------------------------------------------- watchdog


def tree_usage(proc) -> tuple[int, float]:
    """(resident bytes, CPU seconds user + system) of `proc` and all its descendants."""
    import psutil

    rss, cpu = 0, 0.0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0.0
    for q in procs:
        try:
            with q.oneshot():
                rss += q.memory_info().rss
                t = q.cpu_times()
                cpu += t.user + t.system
        except psutil.Error:
            pass
    return rss, cpu


def watched(cmd: list[str], *, log: Path, limit_gb: float, timeout: float, env: dict,
            metrics: Path | None = None, poll: float = 0.5) -> dict:
    """Run `cmd` (stdout+stderr to `log`) with an RSS and time watchdog; the run's record.

    The child gets its own session, so a kill takes its whole process group. `metrics`: a
    jsonl file whose new lines are stamped with the time they appeared.
    """
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    started = datetime.fromtimestamp(start, timezone.utc).isoformat(timespec="milliseconds")
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True)
    proc = psutil.Process(child.pid)
    peak, samples, lines, cpus, killed, cpu = 0, [], [], [], None, 0.0
    status, rusage = None, None
    while True:
        pid, status, rusage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        now = time.time() - start
        rss, cpu_now = tree_usage(proc)
        cpu = max(cpu, cpu_now)
        peak = max(peak, rss)
        samples.append((round(now, 2), rss))
        if metrics is not None and metrics.exists():
            n = sum(1 for _ in metrics.open())
            cpus.extend([round(cpu, 2)] * (n - len(lines)))
            lines.extend([round(now, 2)] * (n - len(lines)))
        if killed is None and (rss > limit_gb * GB or now > timeout):
            killed = (f"killed at {rss / GB:.1f} GB (limit {limit_gb:g} GB)" if rss > limit_gb * GB
                      else f"timed out after {now:.0f} s (rss {rss / GB:.1f} GB)")
            print(f"  watchdog: {killed}", flush=True)
            os.killpg(child.pid, signal.SIGKILL)
        time.sleep(poll)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if metrics is not None and metrics.exists():
        n = sum(1 for _ in metrics.open())
        cpus.extend([round(cpu, 2)] * (n - len(lines)))
        lines.extend([round(wall, 2)] * (n - len(lines)))
    code = child.returncode
    status_s = killed or ("ok" if code == 0 else f"failed (exit {code})")
    train_end = lines[-1] if lines else None
    train_peak = max((r for t, r in samples if train_end is None or t <= train_end), default=0)
    step = max(1, len(samples) // 400)  # keep ~400 points of the RSS curve
    return dict(status=status_s, exit_code=code, wall_s=wall, peak_rss_bytes=peak,
                peak_rss_train_bytes=train_peak if lines else None,
                ru_maxrss_bytes=rusage.ru_maxrss * 1024 if rusage else None,
                cpu_s=rusage.ru_utime + rusage.ru_stime if rusage else cpu,
                metric_line_times_s=lines, metric_line_cpu_s=cpus,
                rss_curve=[list(s) for s in samples[::step]], started=started,
                load_avg_1min_end=os.getloadavg()[0], log=str(log))


# --------------------------------------------------------------------------- runs


def trl_run(a, name: str) -> dict:
    p = paths(a)
    if not TRL_PY.exists():
        return dict(status=f"skipped: {TRL_PY} missing (make bench-trl-env)")
    out = p["records"] / f"{name}.line.json"
    out.unlink(missing_ok=True)
    cmd = [str(TRL_PY), str(HERE / "trl_real_scale.py"), "--model", str(p["model"]),
           "--train", str(p["train"]), "--eval", str(p["eval"]), "--seq", str(a.seq),
           "--pairs", str(a.batch), "--steps", str(a.steps - 1), "--warmup", str(a.trl_warmup),
           "--threads", str(a.threads), "--out", str(out)]
    if name == "trl_bf16":
        cmd.append("--bf16")
    if name == "trl_f32_lora":
        cmd += ["--lora-rank", str(LORA["rank"]), "--lora-alpha", str(LORA["alpha"])]
    env = dict(os.environ, TQDM_DISABLE="1")
    load0 = os.getloadavg()
    rec = watched(cmd, log=p["runs"] / f"{name}.log", limit_gb=a.rss_limit,
                  timeout=a.run_timeout, env=env)
    rec["load_avg_start"] = list(load0)
    rec["load_avg_end"] = list(os.getloadavg())
    if not out.exists():  # killed: keep the phases it printed (load, precompute) as it went
        phases = [json.loads(x[6:]) for x in (p["runs"] / f"{name}.log").read_text().splitlines()
                  if x.startswith("PHASE ")]
        for ph in phases:
            rec.update(ph)
        if phases:
            rec["ref_s"] = sum(rec.get("precompute_s", {}).values()) or None
    if out.exists():
        trl = json.loads(out.read_text())
        rec.update(trl=trl, step_s=trl["step_s"], step_s_all=trl["step_s_all"],
                   cpu_step_s=trl.get("cpu_step_s"), cpu_step_s_all=trl.get("cpu_step_s_all"),
                   load_s=trl["load_s"], ref_s=sum(trl["precompute_s"].values()))
    rec.update(framework="trl", compute="bfloat16 autocast" if name == "trl_bf16" else "float32",
               weights="float32", moments="float32", devices=1, command=cmd,
               lora=LORA if name == "trl_f32_lora" else None)
    return rec


def pj_load_run(a) -> dict:
    p = paths(a)
    code = ("import json, sys, time\n"
            "import jax\n"
            "from flax import nnx\n"
            "from prefjax.models.hf import load_hf\n"
            "t = time.perf_counter()\n"
            "m, _ = load_hf(sys.argv[1], tokenizer=False)\n"
            "jax.block_until_ready(nnx.state(m))\n"
            "print('LOAD_S', time.perf_counter() - t)\n")
    cmd = [str(PJ_PY), "-c", code, str(p["model"])]
    rec = watched(cmd, log=p["runs"] / "pj_load.log", limit_gb=a.rss_limit,
                  timeout=a.run_timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    m = re.search(r"LOAD_S ([0-9.]+)", (p["runs"] / "pj_load.log").read_text())
    rec.update(framework="prefjax", compute="-", weights="float32", devices=1, command=cmd,
               load_s=float(m.group(1)) if m else None)
    return rec


def config_fields() -> set[str]:
    """Dotted names of every field of configs/dpo_hh.py (to use new options only if present)."""
    code = ("import importlib.util, json\n"
            "s = importlib.util.spec_from_file_location('c', 'configs/dpo_hh.py')\n"
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
            "def flat(d, p=''):\n"
            "    for k, v in d.items():\n"
            "        yield from flat(v, p + k + '.') if hasattr(v, 'items') else [p + k]\n"
            "print(json.dumps(sorted(flat(m.get_config()))))\n")
    out = subprocess.run([str(PJ_PY), "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+): (.*)$")  # basicConfig
ABSL_TIME = re.compile(r"^[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d{6}) +\d+ (\S+)\] (.*)$")


def log_events(text: str, started: str) -> list[tuple[float, str, str]]:
    """(seconds since the run started, source, message) of each timestamped log line, in
    Python's basicConfig format or absl's (which takes over once absl.app runs)."""
    t0 = datetime.fromisoformat(started)
    out = []
    for line in text.splitlines():
        m, a = LOG_TIME.match(line), ABSL_TIME.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=t0.tzinfo)
            out.append(((t - t0).total_seconds(), m.group(2), m.group(3)))
        elif a:
            t = datetime.strptime(f"{t0.year}{a.group(1)} {a.group(2)}", "%Y%m%d %H:%M:%S.%f")
            t = t.replace(tzinfo=timezone.utc)  # absl stamps local time; this box runs UTC
            out.append(((t - t0).total_seconds(), a.group(3), a.group(4)))
    return out


def pj_run(a, name: str, fields: set[str], load_s: float | None) -> dict:
    p = paths(a)
    wd = p["runs"] / name
    shutil.rmtree(wd, ignore_errors=True)
    shared_ref = p["runs"] / "_ref_logps"  # reference log-probs of an earlier prefjax run
    if a.reuse_reference and shared_ref.is_dir():
        # the cache prefjax itself would find on resume: keyed by reference identity, token
        # ids and truncation, so it is valid for every run here (same checkpoint and data)
        shutil.copytree(shared_ref, wd / "ref_logps")
    compute = "bfloat16" if name == "pj_bf16" else "float32"
    flags = dict(
        **{"model.source": p["model"], "data.source": p["train"], "data.eval_source": p["eval"],
           "data.max_length": a.seq, "data.max_prompt_length": a.prompt_len,
           "data.max_response_length": a.seq - a.prompt_len, "train.batch_size": a.batch,
           "train.num_steps": a.steps, "train.log_every": 1, "train.eval_every": a.steps,
           "train.save_every": a.steps, "train.keep_checkpoints": 1,
           "train.export_hf": False, "model.dtype": compute})
    moments, config = "float32", "configs/dpo_hh.py"
    if name == "pj_f32_lora":
        config = "configs/dpo_lora_hh.py"
        flags.update({"lora.rank": LORA["rank"], "lora.alpha": LORA["alpha"]})
    if name == "pj_f32_bf16m":
        if "train.moment_dtype" not in fields:
            return dict(status="skipped: configs/dpo_hh.py has no train.moment_dtype field",
                        framework="prefjax")
        flags["train.moment_dtype"] = "bfloat16"
        moments = "bfloat16"
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # no probing for a TPU (libtpu may be installed)
    devices = 1
    if name == "pj_f32_fsdp8":
        devices = 8
        flags["mesh.fsdp"] = 8
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=8").strip()
    cmd = [str(PJ_PY), "-m", "prefjax.main", f"--config={config}", f"--workdir={wd}",
           *[f"--config.{k}={v}" for k, v in flags.items()], *a.pj_extra.split()]
    load0 = os.getloadavg()
    rec = watched(cmd, log=p["runs"] / f"{name}.log", limit_gb=a.rss_limit,
                  timeout=a.run_timeout, env=env, metrics=wd / "metrics.jsonl")
    rec["load_avg_start"] = list(load0)
    rec["load_avg_end"] = list(os.getloadavg())
    rec.update(framework="prefjax", compute=compute, weights="float32", moments=moments,
               devices=devices, command=cmd, lora=LORA if name == "pj_f32_lora" else None,
               reference_cached=bool(a.reuse_reference and (p["runs"] / "_ref_logps").is_dir()))
    metrics = []
    if (wd / "metrics.jsonl").exists():
        metrics = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if x]
        shutil.copyfile(wd / "metrics.jsonl", p["runs"] / f"{name}.metrics.jsonl")
    steps = {m["step"]: 1.0 / m["perf/steps_per_sec"] for m in metrics
             if m.get("perf/steps_per_sec")}
    timed = [steps[s] for s in range(2, a.steps) if s in steps]
    cpu = rec["metric_line_cpu_s"]  # CPU seconds of the tree when line k (step k+1) appeared
    cpu_timed = [cpu[s - 1] - cpu[s - 2] for s in range(2, a.steps) if s <= len(cpu)]
    rec.update(cpu_step_s=statistics.median(cpu_timed) if cpu_timed else None,
               cpu_step_s_all=cpu_timed)
    rec.update(step_s=statistics.median(timed) if timed else None, step_s_all=timed,
               step_s_by_step=steps, losses=[m.get("loss") for m in metrics])
    events = log_events((p["runs"] / f"{name}.log").read_text(), rec["started"])
    rec["log_events"] = [(round(t, 2), lg, msg[:160]) for t, lg, msg in events]
    tok = [t for t, _, msg in events if "tokenized" in msg]
    ref = [t for t, _, msg in events if "reference log-probs" in msg]
    if tok and ref:
        rec["load_plus_ref_s"] = ref[-1] - tok[-1]
        rec["ref_s"] = rec["load_plus_ref_s"] - load_s if load_s is not None else None
    rec["load_s"] = load_s
    if rec["metric_line_times_s"]:
        rec["first_step_done_s"] = rec["metric_line_times_s"][0]
    shutil.rmtree(wd / "checkpoints", ignore_errors=True)  # ~6 GB each at full shape
    return rec


# --------------------------------------------------------------------------- report


def _killed_for_rss(r: dict) -> bool:
    return str(r.get("status", "")).startswith("killed at")


def targets(recs: dict) -> list[dict]:
    """Issue 14's targets against this run's figures. `met` is True / False, or None when it
    cannot be decided (a side missing, or both sides killed at the RSS limit); a run killed at
    the limit has a peak of at least the limit, which decides the RSS targets one way or the
    other when the other side finished."""
    def check(name: str, what: str, key: str, factor: float, against: str = "trl_f32") -> dict:
        trl = recs.get(against, {})
        r = recs.get(name, {})
        value, bound = r.get(key), trl.get(key)
        bound = bound * factor if bound is not None else None
        met, note = None, ""
        ok, trl_ok = r.get("status") == "ok", trl.get("status") == "ok"
        if key == "peak_rss_bytes" and (_killed_for_rss(r) or _killed_for_rss(trl)):
            if ok and _killed_for_rss(trl) and factor == 1.0:
                met, note = True, "prefjax finished below the limit TRL exceeded"
            elif _killed_for_rss(r) and trl_ok:
                met, note = (False if value > bound else None), "prefjax killed at the limit"
            elif _killed_for_rss(r) and _killed_for_rss(trl):
                note = "both killed at the limit: undecided"
        elif ok and trl_ok and value is not None and bound is not None:
            met = value <= bound
        return dict(run=name, target=what, value=value, bound=bound, met=met, note=note,
                    status=r.get("status"), trl_status=trl.get("status"), against=against)

    out = [check(n, "peak RSS <= TRL float32 peak RSS", "peak_rss_bytes", 1.0)
           for n in ("pj_f32", "pj_f32_fsdp8")]
    out.append(check("pj_f32_bf16m", "peak RSS (bf16 moments) <= 0.75 x TRL float32 peak RSS",
                     "peak_rss_bytes", 0.75))
    out += [check(n, "s/step (float32 compute) <= TRL float32 s/step", "step_s", 1.0)
            for n in ("pj_f32", "pj_f32_fsdp8", "pj_f32_bf16m")]
    out += [check(n, "CPU s/step (float32) <= TRL float32 CPU s/step", "cpu_step_s", 1.0)
            for n in ("pj_f32", "pj_f32_fsdp8", "pj_f32_bf16m")]
    # issue 17: LoRA with one model in memory, against TRL + PEFT (no numeric target there)
    out += [check("pj_f32_lora", f"LoRA {w} <= TRL + PEFT {w}", k, 1.0, "trl_f32_lora")
            for w, k in (("peak RSS", "peak_rss_bytes"), ("s/step", "step_s"),
                         ("CPU s/step", "cpu_step_s"))]
    return out


def fmt(x, unit: str = "", nd: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x / GB:.2f}" if unit == "GB" else f"{x:.{nd}f}"


def table(recs: dict, tgts: list[dict]) -> str:
    head = ("| run | framework | devices | compute | moments | status | peak RSS GB | "
            "train peak GB | s/step | CPU s/step | load s | reference s | wall s | load avg |")
    rows = [head, "|" + "---|" * 14]
    for name, r in recs.items():
        rows.append(
            f"| {name} | {r.get('framework', '-')} | {r.get('devices', '-')} | "
            f"{r.get('compute', '-')} | {r.get('moments', '-')} | {r.get('status', '-')} | "
            f"{fmt(r.get('peak_rss_bytes'), 'GB')} | {fmt(r.get('peak_rss_train_bytes'), 'GB')} | "
            f"{fmt(r.get('step_s'))} | {fmt(r.get('cpu_step_s'))} | {fmt(r.get('load_s'))} | "
            f"{fmt(r.get('ref_s'))} | {fmt(r.get('wall_s'), nd=0)} | "
            f"{fmt((r.get('load_avg_start') or [None])[0])}-"
            f"{fmt((r.get('load_avg_end') or [None])[0])} |")
    rows += ["", "| target | run | value | bound (TRL) | met |", "|---|---|---|---|---|"]
    for t in tgts:
        rss = "RSS" in t["target"]
        killed = t["status"] and t["status"].startswith("killed at")
        trl_killed = t["trl_status"] and t["trl_status"].startswith("killed at")
        v = (">= " if rss and killed else "") + fmt(t["value"], "GB" if rss else "") + (
            " GB" if rss else " s")
        b = (">= " if rss and trl_killed else "") + fmt(t["bound"], "GB" if rss else "") + (
            " GB" if rss else " s")
        why = t["note"] or f"prefjax {t['status'] or 'not run'}, TRL {t['trl_status'] or 'not run'}"
        met = {True: "yes", False: "NO", None: "undecided"}[t["met"]] + f" ({why})"
        rows.append(f"| {t['target']} | {t['run']} | {v} | {b} | {met} |")
    return "\n".join(rows)


DEFINITIONS = {
    "peak_rss_bytes": "max over the run of the summed RSS of the child process and its "
                      "descendants, polled every 0.5 s (psutil)",
    "peak_rss_train_bytes": "the same, up to the moment the last step's metrics line appeared "
                            "(excludes prefjax's final checkpoint write)",
    "ru_maxrss_bytes": "the kernel's high-water mark of the direct child (wait4 rusage)",
    "step_s": "median seconds per step: prefjax 1/perf/steps_per_sec of steps 2..steps-1 "
              "(log_every=1); TRL gaps between on_step_end callbacks after warmup",
    "cpu_step_s": "median CPU seconds (user + system, all threads) per step, the same steps: "
                  "prefjax the process tree's CPU time (psutil, polled every 0.5 s) between the "
                  "appearances of consecutive metrics lines; TRL time.process_time() between "
                  "on_step_end callbacks. Less sensitive than wall time to other jobs on a "
                  "shared machine (each side is charged only for the cycles it ran)",
    "load_avg": "1-minute load average when the run started and when it ended",
    "load_s": "prefjax: load_hf(folder) alone, imports excluded (run pj_load); TRL: "
              "AutoModelForCausalLM.from_pretrained(folder, dtype=float32)",
    "ref_s": "prefjax: last 'tokenized' log line to last 'reference log-probs' log line minus "
             "pj_load's load_s; TRL: time inside _precompute_ref_logps, train + eval rows",
    "targets": "issue 14: peak RSS at equal precision <= TRL float32; with bf16 moments <= 0.75x; "
               "step time <= TRL at equal compute dtype (float32)",
}


def main(argv=None) -> None:
    a = parse(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # _report imports jax: no TPU probing here
    if a.build_here:
        print(json.dumps(build(a)))
        return
    p = paths(a)
    info = ensure_built(a)
    if a.build_only:
        print(json.dumps(info, indent=1))
        return
    print(f"checkpoint {p['model']}: {info['params'] / 1e6:.1f} M parameters, "
          f"{len(info['shards'])} shards, tokenizer vocab {info['tokenizer_vocab']}", flush=True)
    p["records"].mkdir(parents=True, exist_ok=True)
    recs: dict[str, dict] = {}
    fields = config_fields() if any(r.startswith("pj_") for r in a.runs) else set()
    for name in a.runs:
        rec_path = p["records"] / f"{name}.json"
        if (a.report_only or a.reuse) and rec_path.exists():
            recs[name] = json.loads(rec_path.read_text())
            continue
        if a.report_only:
            continue
        print(f"{name} ...", flush=True)
        if name.startswith("trl_"):
            rec = trl_run(a, name)
        elif name == "pj_load":
            rec = pj_load_run(a)
        else:
            load = recs.get("pj_load") or (json.loads((p["records"] / "pj_load.json").read_text())
                                           if (p["records"] / "pj_load.json").exists() else {})
            rec = pj_run(a, name, fields, load.get("load_s"))
        rec_path.write_text(json.dumps(rec, indent=1, default=str))
        recs[name] = rec
        print(f"  {rec['status']}: peak {fmt(rec.get('peak_rss_bytes'), 'GB')} GB, "
              f"s/step {fmt(rec.get('step_s'))}, wall {fmt(rec.get('wall_s'), nd=0)} s", flush=True)
    tgts = targets(recs)
    print(table(recs, tgts))
    sys.path.insert(0, str(HERE))
    from _report import machine, write

    isa = isa_flags()
    out = a.out or str(HERE / "results" / "real_scale.json" if full_shape(a) else
                       p["base"] / "real_scale.json")
    write(dict(
        benchmark="real_scale", shape=shape_tag(a),
        sizes=dict(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                   intermediate=a.intermediate, vocab=a.vocab, seq=a.seq,
                   prompt_len=a.prompt_len, batch_pairs=a.batch, steps=a.steps,
                   train_pairs=a.pairs, eval_pairs=a.eval_pairs),
        build=info, rss_limit_gb=a.rss_limit, pj_extra=a.pj_extra, definitions=DEFINITIONS,
        targets=tgts, runs={k: {kk: vv for kk, vv in v.items() if kk != "trl"} | (
            {"trl": v["trl"]} if "trl" in v else {}) for k, v in recs.items()},
        machine=machine(vector_isa=isa, mem_total_gb=mem_total_gb())), out)


def isa_flags() -> list[str]:
    """The vector extensions of this CPU that matter for matmuls (from /proc/cpuinfo)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    keep = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
            "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return [f for f in keep if f in flags]


def mem_total_gb() -> float | None:
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        return round(kb * 1024 / 2**30, 1)
    except (OSError, StopIteration):
        return None


if __name__ == "__main__":
    main()
