"""Peak memory of grad(sum(sequence_logps)) with and without the vocabulary-chunked log-softmax.

Memory comes from XLA's compiled buffer assignment (`jax.jit(f).lower(...).compile()
.memory_analysis()`), so it is exact for the compiled program and needs no allocator hooks:

  temp     bytes of intermediate buffers live at some point (activations, logits, grads in flight)
  args     bytes of the inputs (parameters + batch)
  output   bytes of the results (the gradient pytree + the loss)
  peak     temp + args + output - aliased: an upper bound on what the step holds at once

The headline number is `temp` against naive: args and output are the same for every variant
(parameters in, their gradients out). The naive column is the size of one float32 [b, t, v]
logits tensor, what an unchunked log-softmax must materialise (its backward holds about two).

    .venv/bin/python benchmarks/logps_memory.py                 # defaults: CPU-sized, < 1 min
    .venv/bin/python benchmarks/logps_memory.py --batch 4 --seq 512 --chunks 8192,32768
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import machine, write  # benchmarks/_report.py (scripts run from this folder)
from flax import nnx

from prefjax import lm
from prefjax.models.llama import Llama, LlamaConfig

MiB = 2**20


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--chunks", default="4096,16384",
                   help="comma-separated vocabulary chunk sizes to measure besides 'none'")
    p.add_argument("--no-run", action="store_true",
                   help="only compile and read memory analysis; skip the timed execution")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "logps_memory.json"))
    return p.parse_args()


def make_step(model: nnx.Module, chunk: int | None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, ids, mask, loss_mask):
        m = nnx.merge(graphdef, p, rest)
        return jnp.sum(lm.sequence_logps(m, ids, mask, loss_mask, chunk_size=chunk))

    return jax.jit(jax.value_and_grad(loss)), params


def measure(model, chunk, batch, run: bool) -> dict:
    step, params = make_step(model, chunk)
    t0 = time.perf_counter()
    compiled = step.lower(params, *batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    row = dict(chunk=chunk or "none", temp=ma.temp_size_in_bytes,
               args=ma.argument_size_in_bytes, output=ma.output_size_in_bytes,
               alias=ma.alias_size_in_bytes, compile_s=round(compile_s, 2))
    row["peak"] = row["temp"] + row["args"] + row["output"] - row["alias"]
    if run:
        jax.block_until_ready(compiled(params, *batch))  # warm
        t0 = time.perf_counter()
        value, _ = jax.block_until_ready(compiled(params, *batch))
        row["step_s"] = round(time.perf_counter() - t0, 3)
        row["value"] = float(value)
    return row


def main() -> None:
    a = parse()
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_layers=a.layers, num_heads=4, num_kv_heads=4)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
    mask = jnp.ones((a.batch, a.seq), jnp.int32)
    loss_mask = mask.at[:, : a.seq // 4].set(0)
    naive = a.batch * a.seq * a.vocab * 4
    chunks = [None] + [int(c) for c in a.chunks.split(",") if c]
    rows = [measure(model, c, (ids, mask, loss_mask), not a.no_run) for c in chunks]

    values = [r["value"] for r in rows if "value" in r]
    if values and not np.allclose(values, values[0], rtol=1e-4):
        raise SystemExit(f"chunked and unchunked losses disagree: {[r.get('value') for r in rows]}")
    print(f"grad(sum(sequence_logps)): b={a.batch} t={a.seq} v={a.vocab} d={a.hidden} "
          f"layers={a.layers}; naive f32 [b,t,v] = {naive / MiB:.1f} MiB")
    head = (f"{'chunk':>8} {'temp MiB':>9} {'temp/naive':>10} {'args MiB':>9} {'out MiB':>8} "
            f"{'peak MiB':>9} {'step s':>7}")
    print(head)
    for r_ in rows:
        print(f"{r_['chunk']!s:>8} {r_['temp'] / MiB:9.1f} {r_['temp'] / naive:10.2f} "
              f"{r_['args'] / MiB:9.1f} {r_['output'] / MiB:8.1f} {r_['peak'] / MiB:9.1f} "
              f"{r_.get('step_s', float('nan')):7.3f}")

    result = dict(
        benchmark="logps_memory", metric="XLA compiled memory_analysis, bytes",
        peak_definition="temp + args + output - alias",
        sizes=dict(batch=a.batch, seq=a.seq, vocab=a.vocab, hidden=a.hidden, layers=a.layers),
        naive_f32_logits_bytes=naive, rows=rows,
        machine=machine())
    write(result, a.out)


if __name__ == "__main__":
    main()
