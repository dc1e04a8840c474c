"""Where a real-shape DPO step's memory goes, from the compiler: `prefjax.plan` on CPU devices.

The step of `configs/dpo_hh.py` (precomputed reference, remat, chunked log-softmax, scanned
layers, blockwise attention) on the Qwen2.5-0.5B shape (`configs/shapes/qwen2_5_0_5b.json`, 494 M
parameters, vocab 151936) at `benchmarks/real_scale.py`'s lengths (8 pairs = 16 rows of 256
tokens), compiled for this host's CPU devices (`--topology=cpu:N`), no weights and no data. For
each variant, XLA's `memory_analysis()` per device: arguments (the donated train state: float32
params + AdamW moments, and the batch), temporaries (gradients, saved activations, log-softmax
blocks, everything else live at the peak of XLA's schedule) and their total. These are
properties of the compiled program: the machine's load does not change them, and the process's
peak RSS adds the runtime (Python, XLA, the input pipeline) on top (`real_scale.py` measures it).

    .venv/bin/python benchmarks/step_memory.py    # table + benchmarks/results/step_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GB = 1e9

# name -> (devices, config overrides, what it shows)
VARIANTS = {
    "f32": (1, {}, "float32 params, moments and compute (equal precision with TRL's float32)"),
    "bf16_moments": (1, {"train.moment_dtype": "bfloat16"}, "AdamW moments stored in bf16"),
    "bf16_compute": (1, {"model.dtype": "bfloat16"}, "bf16 compute, float32 master weights"),
    "unrolled": (1, {"model.scan_layers": False},
                 "layers unrolled (scan off), remat on: XLA's CPU schedule keeps activations"),
    "xla_attention": (1, {"model.attention": "xla"}, "reference attention instead of blockwise"),
    "fsdp8": (8, {"mesh.fsdp": 8}, "8 simulated devices, params/moments/rows over fsdp"),
}


def config(overrides: dict):
    sys.path.insert(0, str(ROOT))
    from configs.dpo_hh import get_config

    c = get_config()
    c.model.source = str(ROOT / "configs" / "shapes" / "qwen2_5_0_5b.json")
    c.model.dtype = "float32"
    c.data.max_length, c.data.max_prompt_length, c.data.max_response_length = 256, 128, 128
    c.train.batch_size = 8
    c.mesh.fsdp = 1
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def measure(name: str) -> dict:
    """One variant, compiled in this process (which must have the variant's device count)."""
    from prefjax.plan import plan

    devices, overrides, _ = VARIANTS[name]
    r = plan(config(overrides), f"cpu:{devices}")
    m = r["memory"]
    return {"variant": name, "devices": devices, "overrides": overrides,
            "params": r["params"]["trainable"], "per_device_bytes": m,
            "process_total_bytes": m["total"] * devices,
            "compile_seconds": r["compile_seconds"]}


def run_variant(name: str) -> dict:
    """`measure(name)` in a child process with the variant's number of CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={VARIANTS[name][0]}")
    out = subprocess.run([sys.executable, __file__, "--one", name], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"variant {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| variant | devices | arguments GB | temporaries GB | total GB / device | "
            "process GB | what it shows |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m = r["per_device_bytes"]
        lines.append(f"| {r['variant']} | {r['devices']} | {m['arguments'] / GB:.2f} | "
                     f"{m['temporaries'] / GB:.2f} | {m['total'] / GB:.2f} | "
                     f"{r['process_total_bytes'] / GB:.2f} | {VARIANTS[r['variant']][2]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(HERE / "results" / "step_memory.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one)))
        return
    names = a.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows = []
    for name in names:
        rows.append(run_variant(name))
        print(f"{name}: {rows[-1]['per_device_bytes']['total'] / GB:.2f} GB per device",
              flush=True)
    print(table(rows))
    sys.path.insert(0, str(HERE))
    import _report

    _report.write({"machine": _report.machine(), "shape": "qwen2_5_0_5b", "rows": rows,
                   "definitions": {
                       "arguments": "donated train state + batch, per device",
                       "temporaries": "XLA temp_size_in_bytes: everything else at the peak",
                       "total": "arguments + outputs - alias + temporaries + code",
                       "process": "total x devices (one process holds every CPU device)"}},
                  a.out)


if __name__ == "__main__":
    main()
