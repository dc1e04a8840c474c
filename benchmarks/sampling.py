"""Generation throughput: prefjax's jitted KV-cache Sampler vs HF `model.generate` (torch, CPU).

One random Llama is made with transformers (`LlamaForCausalLM`, seeded init, `save_pretrained`
to a temporary folder) and loaded into prefjax with `load_hf`, so both sides run the same
weights on the same left-padded prompts of mixed lengths, with the same max_new_tokens and
sampling settings. The model has no EOS id, so every row generates exactly max_new_tokens on
both sides (checked) and tokens/s compares equal work.

  tokens/s  batch * max_new_tokens / wall time of one generate call: median of --runs, after
            a warm-up call each, the two sides taking turns run by run
  compile s prefjax's warm-up call (trace + XLA compile + one run)
  agree     greedy only: fraction of generated tokens where prefjax and HF pick the same id

    .venv/bin/python benchmarks/sampling.py                      # defaults: CPU-sized, ~1 min
    .venv/bin/python benchmarks/sampling.py --batch 16 --max-new-tokens 128 --layers 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from _report import machine, write  # benchmarks/_report.py (scripts run from this folder)

from prefjax.models.hf import load_hf
from prefjax.sampling import Sampler

SETTINGS = {  # name -> (prefjax Sampler kwargs, HF generate kwargs)
    "greedy": (dict(greedy=True), dict(do_sample=False)),
    "sample": (dict(temperature=0.8, top_k=50, top_p=0.95),
               dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95)),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-lens", default="16,48",
                   help="min,max real prompt length; rows spread evenly between them")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (XLA's CPU client uses all cores)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    return p.parse_args()


def make_checkpoint(a, folder: Path) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        initializer_range=0.1)  # larger than HF's 0.02 so the logits are not all near-equal
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def make_prompts(a) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids, mask [b, p] with real lengths spread over --prompt-lens; pad id 0."""
    lo, hi = (int(x) for x in a.prompt_lens.split(","))
    lens = np.linspace(lo, hi, a.batch).round().astype(int)
    mask = (np.arange(hi)[None] >= hi - lens[:, None]).astype(np.int32)
    ids = np.random.default_rng(0).integers(1, a.vocab, mask.shape) * mask
    return ids.astype(np.int32), mask


def timed(fns, runs: int) -> list[tuple[float, list[float], object]]:
    """Per fn: (first call s, later calls s, last result).

    After one warm-up call each, the fns take turns run by run, so a burst of load from
    elsewhere on the machine hits both sides alike instead of one side's whole series.
    """
    res = []
    for fn in fns:
        t0 = time.perf_counter()
        out = fn()
        res.append([time.perf_counter() - t0, [], out])
    for _ in range(runs):
        for fn, r in zip(fns, res):
            t0 = time.perf_counter()
            r[2] = fn()
            r[1].append(time.perf_counter() - t0)
    return [tuple(r) for r in res]


def measure(name: str, a, model, hf, ids: np.ndarray, mask: np.ndarray) -> dict:
    """One table row: both generators on the same prompts with setting `name`."""
    ours, theirs = SETTINGS[name]
    b, n = a.batch, a.max_new_tokens
    sampler = Sampler(max_new_tokens=n, **ours)
    keys = iter(jax.random.split(jax.random.key(0), a.runs + 1))

    def run_ours():
        return jax.block_until_ready(sampler(model, ids, mask, next(keys)))

    def run_hf():
        with torch.inference_mode():
            return hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                               attention_mask=torch.as_tensor(mask, dtype=torch.long),
                               max_new_tokens=n, pad_token_id=0, **theirs)

    (compile_s, t_ours, out), (_, t_hf, hf_out) = timed((run_ours, run_hf), a.runs)
    hf_tokens = hf_out[:, ids.shape[1]:].numpy()
    if hf_tokens.shape != (b, n) or int(np.asarray(out.lengths).min()) != n:
        raise SystemExit(f"unequal work: HF generated {hf_tokens.shape}, prefjax lengths "
                         f"{np.asarray(out.lengths).tolist()}; expected {n} tokens per row")
    row = dict(setting=name, prefjax_tok_s=round(b * n / statistics.median(t_ours), 1),
               hf_tok_s=round(b * n / statistics.median(t_hf), 1),
               prefjax_s=[round(t, 4) for t in t_ours], hf_s=[round(t, 4) for t in t_hf],
               compile_s=round(compile_s, 2))
    row["speedup"] = round(row["prefjax_tok_s"] / row["hf_tok_s"], 2)
    if name == "greedy":
        row["agree"] = round(float(np.mean(np.asarray(out.tokens) == hf_tokens)), 4)
    return row


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    ids, mask = make_prompts(a)
    b, n = a.batch, a.max_new_tokens
    names = a.settings.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(a, Path(tmp))
        model, _ = load_hf(tmp, tokenizer=False)
    rows = [measure(name, a, model, hf, ids, mask) for name in names]

    print(f"generate: b={b} prompt lens {a.prompt_lens} (left padded to {ids.shape[1]}) "
          f"new={n} v={a.vocab} d={a.hidden} layers={a.layers} heads={a.heads}/{a.kv_heads} "
          f"threads={a.threads}; median of {a.runs}")
    print(f"{'setting':>8} {'prefjax tok/s':>13} {'HF tok/s':>9} {'speedup':>8} "
          f"{'compile s':>9} {'agree':>6}")
    for r in rows:
        print(f"{r['setting']:>8} {r['prefjax_tok_s']:13.1f} {r['hf_tok_s']:9.1f} "
              f"{r['speedup']:8.2f} {r['compile_s']:9.2f} {r.get('agree', float('nan')):6.3f}")

    result = dict(
        benchmark="sampling", metric="generated tokens per second (batch * max_new_tokens / s)",
        settings={k: dict(prefjax=SETTINGS[k][0], hf=SETTINGS[k][1]) for k in names},
        sizes=dict(batch=b, prompt_lens=a.prompt_lens, prompt_pad_len=int(ids.shape[1]),
                   max_new_tokens=n, vocab=a.vocab, hidden=a.hidden, layers=a.layers,
                   heads=a.heads, kv_heads=a.kv_heads, runs=a.runs),
        rows=rows,
        machine=machine(torch_threads=torch.get_num_threads(),
                        load_avg_1m=round(os.getloadavg()[0], 2), torch=torch.__version__,
                        transformers=transformers.__version__))
    write(result, a.out)


if __name__ == "__main__":
    main()
