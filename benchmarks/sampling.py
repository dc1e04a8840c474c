"""Generation throughput: prefjax's jitted rollout engine vs HF `model.generate` (torch, CPU).

One random Llama is made with transformers (`LlamaForCausalLM`, seeded init, `save_pretrained`
to a temporary folder) and loaded into prefjax with `load_hf`, so both sides run the same
weights on the same queue of left-padded prompts of ragged lengths, with the same
max_new_tokens and sampling settings. Scenarios:

  greedy       no EOS: every row generates max_new_tokens on both sides (checked); `agree` is
               the fraction of generated tokens where prefjax and HF pick the same id
  sample       top-k/top-p sampling, no EOS (equal work on both sides)
  sample_topp  top-p alone (HF top_k=0): a cut over the whole vocabulary every step
  sample_eos   the same with --eos-frac of the vocabulary as EOS ids (several ids: any ends a
               row), so responses have mixed lengths: HF decodes a batch until its longest row
               ends; prefjax refills a finished row from the queue (continuous batching)
  sample_eos_n4  4 samples per prompt: HF `num_return_sequences=4` (prefills each prompt 4
               times); prefjax `num_samples=4` (one prefill per prompt, copied to 4 rows)
  sample_eos_tiled4  the rows of sample_eos_n4 with the same keys (tests/test_rollout_engine.py
               checks that the tokens agree), prefjax given the prompts tiled 4 times with
               `num_samples=1`: 4 prefills per prompt, so the difference to sample_eos_n4 is
               the prefill that group sampling shares

Both sides decode --batch rows at a time: HF runs `generate` on chunks of batch / n prompts,
prefjax one call over the whole queue with `cache_rows=batch`.

  tokens/s  real generated tokens (each row up to and including its first EOS) / wall time of
            the whole queue: median of --runs, after a warm-up each, the two sides taking
            turns run by run
  compile s prefjax's warm-up call (trace + XLA compile + one run)
  length    mean generated tokens per row (same distribution on both sides: same model)

    .venv/bin/python benchmarks/sampling.py                      # defaults: batch 32
    .venv/bin/python benchmarks/sampling.py --prompts 128 --max-new-tokens 128 --layers 8
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

SAMPLE = (dict(temperature=0.8, top_k=50, top_p=0.95),
          dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95))
SCENARIOS = {  # name -> (prefjax Sampler kwargs, HF generate kwargs, samples per prompt, EOS,
    #                  prefjax gets the prompts tiled instead of num_samples)
    "greedy": (dict(greedy=True), dict(do_sample=False), 1, False, False),
    "sample": (*SAMPLE, 1, False, False),
    "sample_topp": (dict(temperature=0.8, top_p=0.95),
                    dict(do_sample=True, temperature=0.8, top_k=0, top_p=0.95), 1, False, False),
    "sample_eos": (*SAMPLE, 1, True, False),
    "sample_eos_n4": (*SAMPLE, 4, True, False),
    "sample_eos_tiled4": (*SAMPLE, 4, True, True),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="rows decoded at once, both sides")
    p.add_argument("--prompts", type=int, default=64, help="prompts in the queue")
    p.add_argument("--prompt-lens", default="8,48",
                   help="min,max real prompt length; lengths drawn uniformly between them")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eos-frac", type=float, default=1 / 64,
                   help="fraction of the vocabulary used as EOS ids in the *_eos scenarios")
    p.add_argument("--prefill-buckets", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (XLA's CPU client uses all cores)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
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
    """Left-padded ids, mask [prompts, p] with real lengths uniform over --prompt-lens."""
    lo, hi = (int(x) for x in a.prompt_lens.split(","))
    r = np.random.default_rng(0)
    lens = r.integers(lo, hi + 1, a.prompts)
    mask = (np.arange(hi)[None] >= hi - lens[:, None]).astype(np.int32)
    ids = r.integers(1, a.vocab, mask.shape) * mask
    return ids.astype(np.int32), mask


def real_lengths(tokens: np.ndarray, eos: list[int]) -> np.ndarray:
    """Generated tokens per row [r]: up to and including the first EOS id, else all."""
    hit = np.isin(tokens, eos) if eos else np.zeros(tokens.shape, bool)
    first = np.where(hit.any(1), hit.argmax(1) + 1, tokens.shape[1])
    return first


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


def measure(name: str, a, model, hf, ids: np.ndarray, mask: np.ndarray, eos: list[int]
            ) -> dict:
    """One table row: both generators on the same prompt queue with scenario `name`."""
    ours, theirs, k, use_eos, tile = SCENARIOS[name]
    eos = eos if use_eos else []
    n = a.max_new_tokens
    sampler = Sampler(max_new_tokens=n, num_samples=1 if tile else k, cache_rows=a.batch,
                      eos_id=eos or None, prefill_buckets=a.prefill_buckets, **ours)
    # tiled: row j * b + i is prompt i again, as num_samples lays out sample j of prompt i
    our_ids, our_mask = (np.tile(ids, (k, 1)), np.tile(mask, (k, 1))) if tile else (ids, mask)
    keys = iter(jax.random.split(jax.random.key(0), a.runs + 1))
    per_call = a.batch // k  # prompts per HF generate call

    def run_ours():
        s = jax.block_until_ready(sampler(model, our_ids, our_mask, next(keys)))
        return np.asarray(s.tokens), np.asarray(s.lengths)

    def run_hf():
        outs = []
        with torch.inference_mode():
            for i in range(0, len(ids), per_call):
                out = hf.generate(input_ids=torch.as_tensor(ids[i:i + per_call], dtype=torch.long),
                                  attention_mask=torch.as_tensor(mask[i:i + per_call],
                                                                 dtype=torch.long),
                                  max_new_tokens=n, min_new_tokens=0, pad_token_id=0,
                                  eos_token_id=eos or None, num_return_sequences=k, **theirs)
                t = out[:, ids.shape[1]:].numpy()
                outs.append(np.pad(t, ((0, 0), (0, n - t.shape[1]))))  # all rows ended early
        return np.concatenate(outs)

    (compile_s, t_ours, (tokens, lengths)), (_, t_hf, hf_tokens) = timed((run_ours, run_hf),
                                                                         a.runs)
    hf_lengths = real_lengths(hf_tokens, eos)
    np.testing.assert_array_equal(lengths, real_lengths(tokens, eos))
    if not use_eos and (lengths.min() != n or hf_lengths.min() != n):
        raise SystemExit(f"unequal work in {name}: rows shorter than {n} without EOS")
    ours_tok, hf_tok = int(lengths.sum()), int(hf_lengths.sum())
    row = dict(scenario=name, samples_per_prompt=k, rows=len(lengths),
               prefjax_tok_s=round(ours_tok / statistics.median(t_ours), 1),
               hf_tok_s=round(hf_tok / statistics.median(t_hf), 1),
               prefjax_tokens=ours_tok, hf_tokens=hf_tok,
               prefjax_length=round(float(lengths.mean()), 2),
               hf_length=round(float(hf_lengths.mean()), 2),
               prefjax_s=[round(t, 3) for t in t_ours], hf_s=[round(t, 3) for t in t_hf],
               compile_s=round(compile_s, 2))
    row["speedup"] = round(row["prefjax_tok_s"] / row["hf_tok_s"], 2)
    if name == "greedy":
        row["agree"] = round(float(np.mean(tokens == hf_tokens)), 4)
    return row


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    ids, mask = make_prompts(a)
    n = a.max_new_tokens
    names = a.scenarios.split(",")
    eos = sorted(np.random.default_rng(1).choice(np.arange(1, a.vocab),
                                                 max(1, round(a.eos_frac * a.vocab)),
                                                 replace=False).tolist())
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(a, Path(tmp))
        model, _ = load_hf(tmp, tokenizer=False)
    load0 = os.getloadavg()[0]
    rows = []
    for name in names:
        rows.append(measure(name, a, model, hf, ids, mask, eos))
        print(f"{name}: {rows[-1]}", flush=True)  # progress: a run under load takes minutes

    print(f"generate: {a.prompts} prompts, lens {a.prompt_lens} (left padded to "
          f"{ids.shape[1]}), {a.batch} rows at once, new={n} v={a.vocab} d={a.hidden} "
          f"layers={a.layers} heads={a.heads}/{a.kv_heads} threads={a.threads}; {len(eos)} EOS "
          f"ids in *_eos; median of {a.runs}; 1-min load {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'scenario':>14} {'prefjax tok/s':>13} {'HF tok/s':>9} {'speedup':>8} "
          f"{'length':>11} {'compile s':>9} {'agree':>6}")
    for r in rows:
        print(f"{r['scenario']:>14} {r['prefjax_tok_s']:13.1f} {r['hf_tok_s']:9.1f} "
              f"{r['speedup']:8.2f} {r['prefjax_length']:5.1f}/{r['hf_length']:<5.1f} "
              f"{r['compile_s']:9.2f} {r.get('agree', float('nan')):6.3f}")

    result = dict(
        benchmark="sampling",
        metric="real generated tokens per second (up to each row's first EOS) over the queue",
        scenarios={k: dict(prefjax=SCENARIOS[k][0], hf=SCENARIOS[k][1],
                           samples_per_prompt=SCENARIOS[k][2], eos=SCENARIOS[k][3])
                   for k in names},
        sizes=dict(batch=a.batch, prompts=a.prompts, prompt_lens=a.prompt_lens,
                   prompt_pad_len=int(ids.shape[1]), max_new_tokens=n, vocab=a.vocab,
                   hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                   runs=a.runs, eos_ids=len(eos), prefill_buckets=a.prefill_buckets),
        rows=rows,
        machine=machine(torch_threads=torch.get_num_threads(), load_avg_1m_start=round(load0, 2),
                        load_avg_1m_end=round(os.getloadavg()[0], 2), torch=torch.__version__,
                        transformers=transformers.__version__))
    write(result, a.out)


if __name__ == "__main__":
    main()
