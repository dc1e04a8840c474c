"""Compiled memory and time of one attention layer's gradient: "xla" against "blockwise".

Memory comes from XLA's buffer assignment (`jax.jit(f).lower(...).compile().memory_analysis()`):
`temp` is the bytes of intermediates live at some point of grad(sum(w * attend(q, k, v))),
`saved` the bytes of the residuals the forward keeps for the backward
(`jax.ad_checkpoint.saved_residuals`), which is what a layer stack holds per layer without remat.
"xla" keeps the float32 [b, h, t, s] probabilities (quadratic in t); "blockwise" keeps q, k, v,
the output and a float32 logsumexp per query (linear in t).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/attention_memory.py            # ~1 min on CPU
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/attention_memory.py --seqs 512,1024 --no-run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import machine, write  # benchmarks/_report.py (scripts run from this folder)
from jax._src.ad_checkpoint import saved_residuals

from prefjax.models import attention

MiB = 2**20


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="512,1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--impls", default="xla,blockwise")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-run", action="store_true", help="only compile; skip the timed runs")
    p.add_argument("--out",
                   default=str(Path(__file__).parent / "results" / "attention_memory.json"))
    return p.parse_args()


def measure(impl: str, t: int, a: argparse.Namespace) -> dict:
    dtype = jnp.dtype(a.dtype)
    b, h, kh, d = a.batch, a.heads, a.kv_heads, a.head_dim
    key_mask = jnp.ones((b, t), jnp.int32)

    def loss(q, k, v, w):
        o = attention.attend(q, k, v, key_mask=key_mask, q_start=0, scale=d ** -0.5, impl=impl)
        return jnp.sum(w * o.astype(jnp.float32))

    shapes = [(b, t, h, d), (b, t, kh, d), (b, t, kh, d)]
    args = [jax.random.normal(jax.random.key(i), s, dtype) for i, s in enumerate(shapes)]
    args.append(jax.random.normal(jax.random.key(9), shapes[0], jnp.float32))
    saved = sum(int(np.prod(aval.shape)) * aval.dtype.itemsize
                for aval, _ in saved_residuals(loss, *args))
    step = jax.jit(jax.grad(loss, (0, 1, 2)))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    row = dict(impl=impl, t=t, compile_s=round(time.perf_counter() - t0, 2),
               temp_mib=compiled.memory_analysis().temp_size_in_bytes / MiB,
               saved_mib=saved / MiB)
    if not a.no_run:
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        row["fwd_bwd_s"] = round(min(times), 4)
    return row


def main() -> None:
    a = parse()
    rows = [measure(impl, int(t), a) for t in a.seqs.split(",") for impl in a.impls.split(",")]
    print(f"{'impl':>10} {'t':>6} {'temp MiB':>10} {'saved MiB':>10} {'fwd+bwd s':>10}")
    for r in rows:
        print(f"{r['impl']:>10} {r['t']:>6} {r['temp_mib']:>10.1f} {r['saved_mib']:>10.2f} "
              f"{r.get('fwd_bwd_s', float('nan')):>10.4f}")
    write(dict(machine=machine(), args=vars(a), rows=rows), a.out)


if __name__ == "__main__":
    main()
