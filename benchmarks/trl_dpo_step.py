"""HF TRL's DPOTrainer step time on the same tiny Llama as benchmarks/dpo_step.py; one JSON line.

Runs in its own environment (torch, transformers, trl), never in prefjax's:

    make bench-trl-env      # python3 -m venv benchmarks/.venv-trl && pip install torch==2.13.0 ...
    benchmarks/.venv-trl/bin/python benchmarks/trl_dpo_step.py --seq 256 --pairs 8

Same setup as prefjax's rows: `LlamaForCausalLM` (random init) with the same sizes, a live
reference model (a frozen copy of the initial policy, `precompute_ref_log_probs=False`), DPO
sigmoid loss, beta 0.1, AdamW (weight decay 0, constant learning rate, grad-norm clip 1.0),
float32 (`bf16=False`), no gradient checkpointing (prefjax's Llama does not remat by default).

Every row has exactly `--seq` tokens: a word-level tokenizer maps the words `w0 .. w{v-2}` to
one id each (id v-1 is EOS), the prompt is `seq - response` words, each completion
`response - 1` words plus the EOS that TRL appends, and `max_length = seq`, so TRL's collator
builds [2 * pairs, seq] batches with no padding, like prefjax's.

Timing: a TrainerCallback stamps `time.perf_counter()` at every `on_step_end`; the time of
step i is the gap to step i-1 (everything the trainer does per step: collate, forward,
backward, optimizer, metrics). The first `--warmup` steps are dropped; the median is reported.
torch uses `--threads` intra-op threads (default: all cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import tempfile
import time


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--response", type=int, default=None, help="default seq // 2")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def word_tokenizer(vocab: int):
    """A fast tokenizer with one id per whitespace-separated word `w<i>`; id vocab-1 is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def dataset(a, n: int):
    import numpy as np
    from datasets import Dataset

    r = np.random.default_rng(a.seed)
    resp = a.response or a.seq // 2
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    rows = [dict(prompt=text(r.integers(0, a.vocab - 1, a.seq - resp)),
                 chosen=" " + text(r.integers(0, a.vocab - 1, resp - 1)),
                 rejected=" " + text(r.integers(0, a.vocab - 1, resp - 1)))
            for _ in range(n)]
    return Dataset.from_list(rows)


def main() -> None:
    a = parse()
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import transformers
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=max(2048, a.seq),
                      rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=a.vocab - 1,
                      pad_token_id=a.vocab - 1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).float()
    ref = copy.deepcopy(model).eval()
    tok = word_tokenizer(a.vocab)
    total = a.warmup + a.steps

    stamps: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=a.pairs, max_steps=total,
            learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, beta=a.beta, loss_type=["sigmoid"], max_length=a.seq,
            precompute_ref_log_probs=False, bf16=False, fp16=False, gradient_checkpointing=False,
            use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=a.seed,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=dataset(a, a.pairs * total), callbacks=[Timer()])
        batch = next(iter(trainer.get_train_dataloader()))
        shape = tuple(batch["input_ids"].shape)
        real = int(batch["attention_mask"].sum())
        if shape != (2 * a.pairs, a.seq) or real != 2 * a.pairs * a.seq:
            raise SystemExit(f"TRL batch is {shape} with padding; expected {(2 * a.pairs, a.seq)}")
        trainer.train()

    gaps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
    timed = gaps[a.warmup:]
    med = statistics.median(timed)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps(dict(
        framework="trl", mode="live", dtype="float32", step_s=med, step_s_all=timed,
        step_s_min=min(timed), warmup_s=gaps[:a.warmup], pairs_per_s=a.pairs / med,
        tokens_per_s=2 * a.pairs * a.seq / med, batch_shape=list(shape), params=n_params,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        load_avg_1min=[load, os.getloadavg()[0]], loss=losses[-1] if losses else None,
        losses=losses, threads=torch.get_num_threads(),
        optimizer=str(trainer.args.optim), attn_implementation=model.config._attn_implementation,
        torch=torch.__version__, trl=trl.__version__, transformers=transformers.__version__)))


if __name__ == "__main__":
    main()
