"""HF TRL's DPOTrainer on benchmarks/real_scale.py's checkpoint and HH data; one JSON file.

Runs in TRL's own environment, never in prefjax's (real_scale.py starts it under its watchdog):

    benchmarks/.venv-trl/bin/python benchmarks/trl_real_scale.py --model M --train T --eval E \
        --out line.json [--bf16]

Setup, as a TRL user would write it: `AutoModelForCausalLM.from_pretrained(folder,
dtype=float32)` (the bf16 shards widened to float32 master weights), the HH transcripts split at
the last "\\n\\nAssistant:" into prompt / chosen / rejected, `DPOConfig(max_length=256,
precompute_ref_log_probs=True, gradient_checkpointing=True, bf16=...)`, no separate reference
model (with precomputed log-probs TRL scores the train and eval rows with the policy itself
before training and keeps no second model), DPO sigmoid loss, beta 0.1, AdamW (TRL's default
optimizer for this torch), constant learning rate, grad-norm clip 1.0, no checkpoint saving, no
evaluation during training. Every row is longer than `--seq` tokens, so TRL's collator builds
[2 * pairs, seq] batches with no padding (checked).

Figures: load_s = from_pretrained; precompute_s = time inside `DPOTrainer._precompute_ref_logps`
per split (a timing wrapper around TRL's method, nothing else changed); init_s = the whole
DPOTrainer constructor (tokenizing + precompute); step_s = median gap between consecutive
`on_step_end` callbacks after `--warmup` steps; cpu_step_s = the same with
`time.process_time()` (CPU seconds of all threads); max_rss_bytes = this process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

HH = "\n\nAssistant:"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint folder")
    p.add_argument("--train", required=True, help="HH jsonl")
    p.add_argument("--eval", default="", help="HH jsonl (its reference log-probs are computed)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="steps in all (warmup included)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 master weights)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="> 0: PEFT LoRA of this rank on every linear layer but the head, and "
                        "the base with adapters disabled as the (live) reference")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", required=True)
    return p.parse_args()


def hh_dataset(path: str):
    """Prompt / chosen / rejected strings from HH transcripts (split at the last marker)."""
    from datasets import Dataset

    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        r = json.loads(line)
        cut = r["chosen"].rfind(HH) + len(HH)
        prompt = r["chosen"][:cut]
        if cut < len(HH) or not r["rejected"].startswith(prompt):
            raise SystemExit(f"{path} row {i}: chosen and rejected do not share an HH prompt")
        rows.append(dict(prompt=prompt, chosen=r["chosen"][cut:], rejected=r["rejected"][cut:]))
    return Dataset.from_list(rows)


def main() -> None:
    a = parse()
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    load_s = time.perf_counter() - t
    print("PHASE " + json.dumps(dict(load_s=load_s)), flush=True)  # kept if the run is killed
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    precompute_s: dict[str, float] = {}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, batch_size):
        t0 = time.perf_counter()
        out = original(self, dataset, name, batch_size)
        precompute_s[name] = precompute_s.get(name, 0.0) + time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    stamps: list[float] = []
    cpu_stamps: list[float] = []  # time.process_time(): this process's CPU seconds, all threads
    losses: list[float] = []
    rss_at: dict[str, int] = {}

    def rss_now() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            rss_at[f"step{len(stamps) - 1}"] = rss_now()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    rss_at["loaded"] = rss_now()
    output_dir = Path(a.out).with_suffix(".trainer")
    args = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=a.pairs,
        per_device_eval_batch_size=a.pairs, max_steps=a.steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=a.beta, loss_type=["sigmoid"], max_length=a.seq,
        precompute_ref_log_probs=not a.lora_rank,
        gradient_checkpointing=True, bf16=a.bf16, fp16=False, use_cpu=True, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    peft_config = None
    if a.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, peft_config=peft_config,
                         train_dataset=hh_dataset(a.train),
                         eval_dataset=hh_dataset(a.eval) if a.eval else None,
                         callbacks=[Timer()])
    init_s = time.perf_counter() - t
    print("PHASE " + json.dumps(dict(precompute_s=precompute_s, init_s=init_s)), flush=True)
    rss_at["precomputed"] = rss_now()
    batch = next(iter(trainer.get_train_dataloader()))
    shape = tuple(batch["input_ids"].shape)
    real = int(batch["attention_mask"].sum())
    if shape != (2 * a.pairs, a.seq) or real != 2 * a.pairs * a.seq:
        raise SystemExit(f"TRL batch is {shape} with {real} real tokens; expected "
                         f"{(2 * a.pairs, a.seq)} without padding")
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t

    gaps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
    timed = gaps[a.warmup:]
    cpu_timed = [t1 - t0 for t0, t1 in zip(cpu_stamps, cpu_stamps[1:])][a.warmup:]
    Path(a.out).write_text(json.dumps(dict(
        framework="trl", dtype="bf16 autocast" if a.bf16 else "float32",
        step_s=statistics.median(timed), step_s_all=timed, warmup_s=gaps[:a.warmup],
        cpu_step_s=statistics.median(cpu_timed), cpu_step_s_all=cpu_timed,
        load_s=load_s, precompute_s=precompute_s, init_s=init_s, train_s=train_s,
        batch_shape=list(shape), params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        lora_rank=a.lora_rank,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_at_bytes=rss_at, load_avg_1min=[load, os.getloadavg()[0]], losses=losses,
        threads=torch.get_num_threads(), optimizer=str(trainer.args.optim),
        gradient_checkpointing=True, attn_implementation=model.config._attn_implementation,
        torch=torch.__version__, trl=trl.__version__, transformers=transformers.__version__)))


if __name__ == "__main__":
    main()
