"""Per-device bytes of parameters + optimizer state, and of the DPO step, for each strategy.

For every `config.mesh.strategy` (dp, fsdp, tp, fsdp_tp, auto) on its natural 8-device mesh, a
small Llama's train state (float32 params + AdamW moments) is created sharded with
`create_train_state`, and its bytes are counted per device from the arrays' addressable shards:

  state     params + opt_state bytes a device holds (replicas count on every device); max over
            devices (all devices hold the same here)
  frac      state / bytes of the whole state (1.0 = a full copy on every device)
  step temp XLA's compiled temp buffers of one DPO train step per device (activations, grads in
            flight), from `memory_analysis()` as in logps_memory.py
  step peak temp + args + output - alias of that step: an upper bound on what a device holds

Runs on 8 simulated CPU devices unless XLA_FLAGS is already set:

    .venv/bin/python benchmarks/sharding_memory.py                # defaults: < 1 min on 2 cores
    .venv/bin/python benchmarks/sharding_memory.py --vocab 32000 --hidden 512 --layers 8 --no-step
"""

from __future__ import annotations

import os

# simulated devices must exist before jax starts; a real accelerator run sets its own flags
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _report import machine, write  # benchmarks/_report.py (scripts run from this folder)
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from prefjax import losses  # noqa: E402
from prefjax.models.llama import Llama, LlamaConfig  # noqa: E402
from prefjax.parallel import batch_shardings  # noqa: E402
from prefjax.train.build import mesh_and_rules  # noqa: E402
from prefjax.train.state import create_train_state  # noqa: E402
from prefjax.train.step import build_train_step  # noqa: E402

MiB = 2**20
# strategy -> (mesh on 8 devices, what its rules shard, when to use it)
STRATEGIES = {
    "dp": ({"data": 8, "fsdp": 1, "tensor": 1}, "nothing (batch only)",
           "model + AdamW state fit on one device; simplest, least communication"),
    "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, "every matrix on its embed dim",
             "state does not fit one device; all-gathers weights per layer, any batch size"),
    "tp": ({"data": 2, "fsdp": 1, "tensor": 4}, "heads, kv heads, MLP, vocab dims",
           "wide layers inside a fast interconnect (one host); cuts activations too"),
    "fsdp_tp": ({"data": 1, "fsdp": 4, "tensor": 2}, "embed over fsdp and heads/MLP/vocab "
                "over tensor", "large models: tensor within a host, fsdp across hosts"),
    "auto": ({"data": 2, "fsdp": 2, "tensor": 2}, "all rules; size-1 axes cost nothing",
             "default: the mesh shape decides"),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--mlp", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--pairs", type=int, default=8, help="global pairs per step (2x rows)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--no-step", action="store_true",
                   help="only count the state's bytes; skip compiling the train step")
    p.add_argument("--out",
                   default=str(Path(__file__).parent / "results" / "sharding_memory.json"))
    return p.parse_args()


def per_device_bytes(tree) -> dict:
    held = collections.Counter()
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            held[s.device] += s.data.nbytes
    return held


def dpo_batch(pairs: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    b = 2 * pairs
    mask = np.ones((b, seq), np.int32)
    return {"input_ids": r.integers(0, vocab, (b, seq)).astype(np.int32),
            "attention_mask": mask, "loss_mask": (np.arange(seq)[None] >= seq // 4) * mask,
            "ref_logps": r.normal(-300.0, 10.0, b).astype(np.float32)}


def measure(name: str, cfg: LlamaConfig, a: argparse.Namespace) -> dict:
    shape, sharded, use = STRATEGIES[name]
    mesh, rules = mesh_and_rules(ConfigDict({"mesh": {**shape, "strategy": name}}))
    opt = optax.adamw(1e-4, weight_decay=0.1)
    state, sh = create_train_state(lambda rngs: Llama(cfg, rngs=rngs), opt, mesh=mesh,
                                   rules=rules)
    tree = (state.params, state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    held = per_device_bytes(tree)
    row = dict(strategy=name, mesh=shape, devices=len(held), state=max(held.values()),
               state_min=min(held.values()), total=total, frac=round(max(held.values()) / total, 4),
               sharded=sharded, when=use)
    if not a.no_step:
        step = build_train_step(losses.get("dpo", beta=0.1), opt, mesh=mesh, state_shardings=sh)
        batch = dpo_batch(a.pairs, a.seq, cfg.vocab_size)
        replicated = NamedSharding(mesh, PartitionSpec())
        # the same jit as the step's own call (shardings, donated state), lowered to read XLA's
        # buffer assignment without running it
        jitted = jax.jit(step.fn, in_shardings=(sh, batch_shardings(batch, mesh)),
                         out_shardings=(sh, replicated), donate_argnums=(0,))
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jitted.lower(state, batch).compile()
        ma = compiled.memory_analysis()
        row.update(step_temp=ma.temp_size_in_bytes, step_args=ma.argument_size_in_bytes,
                   step_output=ma.output_size_in_bytes, step_alias=ma.alias_size_in_bytes,
                   compile_s=round(time.perf_counter() - t0, 2))
        row["step_peak"] = (row["step_temp"] + row["step_args"] + row["step_output"]
                            - row["step_alias"])
    return row


def main() -> None:
    a = parse()
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()} (XLA_FLAGS="
                         f"{os.environ.get('XLA_FLAGS')!r})")
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.mlp,
                      num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads)
    rows = [measure(s, cfg, a) for s in a.strategies.split(",") if s]
    total = rows[0]["total"]
    print(f"Llama v={a.vocab} d={a.hidden} f={a.mlp} layers={a.layers} heads={a.heads}/"
          f"{a.kv_heads}, float32 params + AdamW = {total / MiB:.1f} MiB; DPO step "
          f"{a.pairs} pairs x {a.seq} tokens; {jax.device_count()} {jax.default_backend()} devices")
    print(f"{'strategy':>8} {'mesh d/f/t':>10} {'state MiB':>9} {'frac':>6} {'temp MiB':>8} "
          f"{'peak MiB':>8}  sharded")
    for r in rows:
        m = r["mesh"]
        mesh = f"{m['data']}/{m['fsdp']}/{m['tensor']}"
        temp = f"{r['step_temp'] / MiB:8.1f}" if "step_temp" in r else f"{'-':>8}"
        peak = f"{r['step_peak'] / MiB:8.1f}" if "step_peak" in r else f"{'-':>8}"
        print(f"{r['strategy']:>8} {mesh:>10} {r['state'] / MiB:9.2f} {r['frac']:6.3f} {temp} "
              f"{peak}  {r['sharded']}")
    result = dict(
        benchmark="sharding_memory",
        metric="bytes per device: state from addressable shards, step from XLA memory_analysis",
        peak_definition="temp + args + output - alias",
        sizes=dict(vocab=a.vocab, hidden=a.hidden, mlp=a.mlp, layers=a.layers, heads=a.heads,
                   kv_heads=a.kv_heads, pairs=a.pairs, seq=a.seq, optimizer="adamw"),
        rows=rows,
        machine=machine())
    write(result, a.out)


if __name__ == "__main__":
    main()
