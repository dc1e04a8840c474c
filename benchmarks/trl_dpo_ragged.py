"""HF TRL's DPOTrainer on ragged pairs (the lengths benchmarks/packing.py draws); one JSON line.

Runs in TRL's own environment (`benchmarks/.venv-trl`). Same tiny Llama, live reference, DPO
sigmoid loss, AdamW and float32 as benchmarks/trl_dpo_step.py; the pairs' token lengths come
from `--lengths` (a JSON file of [prompt, chosen, rejected] token counts, EOS included in the
responses): a word-level tokenizer gives one id per word, so a prompt of p words is p tokens and
a response of c - 1 words plus the EOS TRL appends is c tokens. `--padding-free` turns on
`DPOConfig(padding_free=True)` (TRL documents it for FlashAttention 2 on a GPU).

Timing: the median gap between `on_step_end` stamps after `--warmup` steps; real tokens/s = the
mean real tokens of a step (the dataset's mean per pair x pairs) / that median.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from trl_dpo_step import word_tokenizer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, d in (("hidden", 256), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                    ("intermediate", 688), ("vocab", 4096), ("max-length", 256), ("pairs", 8),
                    ("steps", 6), ("warmup", 2), ("seed", 0),
                    ("threads", os.cpu_count() or 1)):
        p.add_argument(f"--{name}", type=int, default=d)
    p.add_argument("--lengths", required=True)
    p.add_argument("--padding-free", action="store_true")
    return p.parse_args()


def main() -> None:
    a = parse()
    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    transformers.logging.set_verbosity_error()
    lengths = json.loads(open(a.lengths).read())
    total = a.warmup + a.steps
    lengths = [lengths[i % len(lengths)] for i in range(a.pairs * total)]
    r = np.random.default_rng(a.seed)
    text = lambda n: " ".join(f"w{i}" for i in r.integers(0, a.vocab - 1, n))  # noqa: E731
    rows = [dict(prompt=text(p), chosen=" " + text(c - 1), rejected=" " + text(j - 1))
            for p, c, j in lengths]
    real_per_step = a.pairs * float(np.mean([2 * p + c + j for p, c, j in lengths]))
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=a.vocab - 1,
                      pad_token_id=a.vocab - 1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).float()
    ref = copy.deepcopy(model).eval()
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(padding_free=True) if a.padding_free else {}
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=a.pairs, max_steps=total,
            learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], max_length=a.max_length,
            precompute_ref_log_probs=False, bf16=False, fp16=False, gradient_checkpointing=False,
            use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=a.seed,
            dataloader_num_workers=0, disable_tqdm=True, **kw)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args,
                             processing_class=word_tokenizer(a.vocab),
                             train_dataset=Dataset.from_list(rows), callbacks=[Timer()])
        batch = next(iter(trainer.get_train_dataloader()))
        shapes = {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
        trainer.train()
    gaps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
    med = statistics.median(gaps[a.warmup:])
    print(json.dumps(dict(
        framework="trl", mode="padding_free" if a.padding_free else "default",
        step_s=med, step_s_all=gaps[a.warmup:], real_tokens_per_step=real_per_step,
        real_tokens_per_s=real_per_step / med, batch_shapes=shapes,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        load_avg_1min=[load, os.getloadavg()[0]], threads=torch.get_num_threads(),
        attn_implementation=model.config._attn_implementation, torch=torch.__version__,
        trl=trl.__version__, transformers=transformers.__version__)))


if __name__ == "__main__":
    main()
