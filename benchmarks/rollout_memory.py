"""What a real-shape rollout costs in memory, from the compiler: the rollout engine with and
without continuous batching (`online.cache_rows`).

A GRPO-sized rollout on the Qwen2.5-0.5B shape (`configs/shapes/qwen2_5_0_5b.json`: 24 layers,
2 kv heads of 64, vocab 151936; float32 weights as the trainers hold them): --prompts prompts of
--prompt-len tokens, --samples samples each, --new tokens (TRL's GRPO defaults: 512 / 8 / 256).
For each `cache_rows`, the sampler's whole jitted generation is compiled from abstract shapes
(no weights, no data) for --fsdp chips of --topology (default one TPU v5e chip, by the TPU compiler
on this CPU host; `cpu` = this host) and XLA's `memory_analysis()` gives its arguments (the
parameters and prompts), temporaries (the KV cache, the prefill's activations, the output
buffers, everything else live at the peak) and their total. Properties of the compiled program:
the machine's load does not change them.

The KV cache column is read from the compiled program, not assumed: at default matmul precision
the TPU compiler stores a float32 model's cache in bfloat16, the precision its attention dots
read it in (so half the float32 size), while XLA CPU keeps float32. --attention picks the
model's attention implementation, which sets the prefill's memory: 'xla' materialises the
[prompts, heads, p, p] scores of the first batched prefill, 'blockwise' and 'splash' do not.
With --fsdp N the parameters and rows are split over N chips as a trainer splits them, every
figure is per chip, and the last column counts the all-gather ops in the decode loop's body
and the computations it calls (`prefjax.compiled`; each computation once, so a scanned
layer's body once): the weights the loop gathers at each step unless --gather-params gathers
them once before it. The JSON adds the bytes their results hold, summed over the program's
text: the TPU compiler clones an async all-gather into many fusions, so that sum is not the
traffic of one step.

    .venv/bin/python benchmarks/rollout_memory.py    # table + results/rollout_memory.json
    .venv/bin/python benchmarks/rollout_memory.py --attention splash --out /tmp/splash.json
    .venv/bin/python benchmarks/rollout_memory.py --topology cpu --out /tmp/cpu.json
    .venv/bin/python benchmarks/rollout_memory.py --fsdp 4 --cache-rows 0,32 \
        --out results/rollout_memory_fsdp4.json    # and with --gather-params
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import machine, write  # benchmarks/_report.py (scripts run from this folder)
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from prefjax import compiled as hlo_text
from prefjax.compiled import BYTES
from prefjax.config import base_config
from prefjax.models import attention
from prefjax.parallel import batch_sharding, make_mesh, param_shardings
from prefjax.plan import oom_figures, topology_devices
from prefjax.plan_shapes import decoder_fn
from prefjax.sampling import Sampler, cache_slack

HERE = Path(__file__).resolve().parent
GB = 1e9


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=str(HERE.parent / "configs" / "shapes" / "qwen2_5_0_5b.json"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--cache-rows", default="0,64,32,16", help="0: every sampled row at once")
    p.add_argument("--topology", default="v5e:2x2", help="compile for its first chip; cpu: host")
    p.add_argument("--attention", default="xla", help="model.attention: xla | blockwise | splash")
    p.add_argument("--scan-layers", action="store_true", help="model.scan_layers (as the *_hh "
                   "configs): one scanned block instead of 24 unrolled ones")
    p.add_argument("--fsdp", type=int, default=1, help="chips of --topology the parameters "
                   "and rows are split over (mesh.fsdp, a trainer's FSDP layout); figures are "
                   "per chip")
    p.add_argument("--gather-params", action="store_true", help="online.gather_params: gather "
                   "the parameters over fsdp once per rollout")
    p.add_argument("--out", default=str(HERE / "results" / "rollout_memory.json"))
    return p.parse_args()


def loop_cache(hlo: str, rows: int, kv_heads: int, slots: int, head_dim: int
               ) -> tuple[str, int, list[str]]:
    """(body, bytes, dtypes) of the compiled decode loop and the KV cache as it carries it:
    the arrays shaped [(layers,) rows, kv_heads, slots, head_dim] that the outermost `while`
    carrying most of them holds (`prefjax.compiled.loop_carrying`). The compiler picks each
    buffer's dtype: the TPU compiler may store one layer's cache in bf16 and another's in
    float32."""
    shape = rf"\b(\w+)\[((?:\d+,)?{rows},{kv_heads},{slots},{head_dim})\]"
    try:
        body = hlo_text.loop_carrying(hlo, shape)
    except ValueError:
        raise SystemExit("no while loop of the compiled program carries a KV cache of shape "
                         f"[{rows}, {kv_heads}, {slots}, {head_dim}]") from None
    found = re.findall(shape, hlo_text.whiles(hlo)[body])
    return (body,
            sum(BYTES[t] * math.prod(int(d) for d in dims.split(",")) for t, dims in found),
            sorted({t for t, _ in found}))


def measure(model_state, graphdef, a, rows: int, mesh, cfg) -> dict:
    s = Sampler(max_new_tokens=a.new, temperature=1.0, num_samples=a.samples,
                cache_rows=rows or None, eos_id=0, mesh=mesh, gather_params=a.gather_params)
    here = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(  # placed as a trainer places them (split over fsdp)
        lambda v, sh: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                           sharding=sh.get_value()),
        model_state, param_shardings(model_state, mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    ids = jax.ShapeDtypeStruct((a.prompts, a.prompt_len), jnp.int32, sharding=(
        batch_sharding(mesh) if a.prompts % a.fsdp == 0 else here))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=here)
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), (attention.compiling_for("tpu") if on_tpu
                              else contextlib.nullcontext()):
        lowered = s._jit.lower(graphdef, state, ids, ids, key)
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler refuses a program that cannot fit in HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return dict(cache_rows=rows, fits=False, compiler_error=str(e).splitlines()[0],
                        **oom_figures(str(e)))
    m = compiled.memory_analysis()
    units = a.prompts * a.samples
    held = min(rows or units, units)  # rows the cache holds
    width = a.prompt_len + a.new - 1  # a row's slots; with refills, the engine's slack too
    slots = width + cache_slack(width, continuous=held < units)
    held //= a.fsdp if held % a.fsdp == 0 else 1  # on each chip
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    hlo = compiled.as_text()
    loop, kv, dtypes = loop_cache(hlo, held, cfg.num_kv_heads, slots, head_dim)
    moved = hlo_text.collectives(hlo, loop)
    if kv > held * slots * cfg.num_layers * 2 * cfg.num_kv_heads * head_dim * 4:
        raise SystemExit(f"cache_rows {rows}: the loop carries more cache-shaped arrays than a "
                         "float32 KV cache of every layer")
    return dict(cache_rows=rows, fits=True, compile_s=round(time.perf_counter() - t0, 1),
                arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                temporaries=m.temp_size_in_bytes,
                total=m.argument_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes + m.temp_size_in_bytes,
                kv_cache_dtypes=dtypes, kv_cache_bytes=kv,
                decode_loop_all_gather_bytes=moved["all-gather"]["bytes"],
                decode_loop_all_gather_ops=moved["all-gather"]["ops"])


def main() -> None:
    a = parse()
    c = base_config()
    c.model.source, c.model.dtype, c.model.attention = a.shape, "float32", a.attention
    c.model.scan_layers = a.scan_layers
    make, cfg, _ = decoder_fn(c)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    units = a.prompts * a.samples
    chips = (jax.devices("cpu") if a.topology == "cpu" else topology_devices(a.topology)[0])
    mesh = make_mesh({"data": 1, "fsdp": a.fsdp, "tensor": 1}, devices=chips[:a.fsdp])
    rows = []
    for r in (int(x) for x in a.cache_rows.split(",")):
        rows.append(measure(state, graphdef, a, r, mesh, cfg))
        print(f"cache_rows {r}: {rows[-1]}", flush=True)

    print(f"rollout: {a.prompts} prompts x {a.samples} samples, prompt {a.prompt_len}, new "
          f"{a.new}; {params / 1e6:.0f} M float32 parameters ({Path(a.shape).name}); compiled "
          f"for {a.fsdp} {chips[0].device_kind} chip(s) (figures per chip; parameters split "
          f"over fsdp, gathered once per rollout: {a.gather_params}); attention {a.attention}, "
          f"scan_layers {a.scan_layers}")
    print("| cache_rows | KV cache GB (dtype) | arguments GB | temporaries GB | total GB | "
          "all-gathers in the decode loop |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r["fits"]:
            print(f"| {r['cache_rows'] or 'all (' + str(units) + ')'} | does not fit: "
                  f"{r.get('temporaries', float('nan')) / GB:.2f} GB of temporaries "
                  f"(the compiler's error) | | | | |")
            continue
        print(f"| {r['cache_rows'] or 'all (' + str(units) + ')'} | {r['kv_cache_bytes'] / GB:.2f}"
              f" ({'+'.join(r['kv_cache_dtypes'])})"
              f" | {r['arguments'] / GB:.2f} | {r['temporaries'] / GB:.2f} | "
              f"{r['total'] / GB:.2f} | {r['decode_loop_all_gather_ops']} |")
    write(dict(benchmark="rollout_memory", shape=Path(a.shape).name, params=params,
               compiled_for=f"{a.fsdp} x {chips[0].device_kind} ({a.topology})",
               fsdp=a.fsdp, gather_params=a.gather_params, attention=a.attention,
               scan_layers=a.scan_layers,
               sizes=dict(prompts=a.prompts, samples=a.samples, prompt_len=a.prompt_len,
                          new=a.new), rows=rows, machine=machine()), a.out)


if __name__ == "__main__":
    main()
