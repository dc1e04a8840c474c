"""DPO on ragged (HH-like) lengths: prefjax padded vs packed vs HF TRL; real tokens/s and memory.

Data: `--pairs` pairs per step with token lengths drawn log-normal (HH-like: medians and spreads
below, prompt <= max_length / 2, each prompt + response <= `--max-length`), the same lengths for
every framework; or the lengths of a real file (`--lengths-from`, a json/jsonl of
prompt/chosen/rejected strings, one token per whitespace-separated word). Model, loss and
optimizer as benchmarks/dpo_step.py (tiny Llama 256 wide, 4 layers, vocab 4096; live reference;
DPO sigmoid, beta 0.1; AdamW; float32; max grad norm 1).

  padded   collate_pairs to [2 * pairs, max_length] (prefjax's layout without packing)
  packed   the same batch packed by prefjax.data.packing (data.packing=True, the default)
  trl      DPOTrainer, default collator (pads each batch to its longest row), in
           benchmarks/.venv-trl (benchmarks/trl_dpo_ragged.py). `--trl-padding-free` adds a
           padding_free=True row; TRL 1.16's DPOTrainer disables that option (it warns and falls
           back to padding, trl/trainer/dpo_trainer.py), so by default it is not run

Each prefjax mode runs in its own process (so max RSS is its own): every distinct batch shape
is compiled first, then `--steps` steps over `--batches` distinct batches (cycled), each step
`block_until_ready`; real tokens/s = real (non-pad) tokens of the timed steps / their time.
Memory: max RSS, and XLA's `memory_analysis()` peak (temp + args + outputs - aliased) of the
largest compiled step.

    .venv/bin/python benchmarks/packing.py               # ~5-10 min on 2 loaded CPUs
    .venv/bin/python benchmarks/packing.py --no-trl --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
TRL_PY = HERE / ".venv-trl" / "bin" / "python"
MiB = 2**20


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, d in (("hidden", 256), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                    ("intermediate", 688), ("vocab", 4096), ("max-length", 256), ("pairs", 8),
                    ("steps", 8), ("batches", 4), ("trl-steps", 6), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=d)
    p.add_argument("--prompt-median", type=float, default=40.0)
    p.add_argument("--prompt-sigma", type=float, default=0.8)
    p.add_argument("--response-median", type=float, default=40.0)
    p.add_argument("--response-sigma", type=float, default=0.9)
    p.add_argument("--lengths-from", default="", help="json/jsonl with prompt/chosen/rejected")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--trl-padding-free", action="store_true")
    p.add_argument("--only", default="", help=argparse.SUPPRESS)  # one prefjax mode (child)
    p.add_argument("--out", default=str(HERE / "results" / "packing.json"))
    return p.parse_args()


def draw_lengths(a, n: int) -> list[list[int]]:
    """n pairs of [prompt, chosen, rejected] token counts (responses include EOS)."""
    if a.lengths_from:
        text = Path(a.lengths_from).read_text()
        rows = ([json.loads(x) for x in text.splitlines() if x.strip()]
                if a.lengths_from.endswith(".jsonl") else json.loads(text))
        words = lambda s: max(1, len(str(s).split()))  # noqa: E731
        raw = [(words(r["prompt"]), words(r["chosen"]) + 1, words(r["rejected"]) + 1)
               for r in rows[:n]]
    else:
        r = np.random.default_rng([a.seed, 18])
        ln = lambda med, sig: max(1, int(round(r.lognormal(np.log(med), sig))))  # noqa: E731
        raw = [(ln(a.prompt_median, a.prompt_sigma), ln(a.response_median, a.response_sigma),
                ln(a.response_median, a.response_sigma)) for _ in range(n)]
    out = []
    for p, c, j in raw:
        p = min(p, a.max_length // 2)
        out.append([p, max(2, min(c, a.max_length - p)), max(2, min(j, a.max_length - p))])
    return out


def host_batches(a, lengths, packed: bool) -> list[dict]:
    from prefjax.data import collate_pairs
    from prefjax.data.packing import pack_batch

    r = np.random.default_rng([a.seed, 1])
    out = []
    for i in range(a.batches):
        rows = [dict(prompt_ids=r.integers(0, a.vocab - 1, p).tolist(),
                     chosen_ids=r.integers(0, a.vocab - 1, c).tolist(),
                     rejected_ids=r.integers(0, a.vocab - 1, j).tolist())
                for p, c, j in lengths[i * a.pairs:(i + 1) * a.pairs]]
        b = collate_pairs(rows, pad_id=0, seq_len=a.max_length)
        out.append(pack_batch(b, pad_id=0) if packed else b)
    return out


def run_mode(a, mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from prefjax import losses
    from prefjax.data.packing import padding_fraction
    from prefjax.models.llama import Llama, LlamaConfig
    from prefjax.parallel import make_mesh
    from prefjax.train.reference import POLICY_PARAMS, WithReference, live_reference_forward
    from prefjax.train.state import create_train_state
    from prefjax.train.step import build_train_step

    lengths = draw_lengths(a, a.pairs * a.batches)
    batches = host_batches(a, lengths, mode == "packed")
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
                      max_position_embeddings=2048)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    opt = optax.adamw(1e-4, weight_decay=0.0)
    make = lambda rngs: WithReference(Llama(cfg, rngs=nnx.Rngs(0)),  # noqa: E731
                                      Llama(cfg, rngs=nnx.Rngs(0)))
    state, sh = create_train_state(make, opt, mesh=mesh, trainable=POLICY_PARAMS)
    step = build_train_step(losses.get("dpo", beta=0.1), opt, mesh=mesh, state_shardings=sh,
                            forward=live_reference_forward(None), max_grad_norm=1.0)
    dev = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    t0 = time.perf_counter()
    seen, peak_mem = set(), 0
    for b in dev:  # compile every distinct shape before timing
        shape = tuple(b.get("packed_input_ids", b["input_ids"]).shape)
        if shape not in seen:
            seen.add(shape)
            state, m = step(state, b)
            jax.block_until_ready(m)
            for jitted in step._jitted.values():
                with jax.set_mesh(mesh):
                    ma = jitted.lower(state, b).compile().memory_analysis()
                peak_mem = max(peak_mem, ma.temp_size_in_bytes + ma.argument_size_in_bytes
                               + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    compile_s = time.perf_counter() - t0
    times, real = [], 0
    for i in range(a.steps):
        b = dev[i % len(dev)]
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        real += int(batches[i % len(dev)]["attention_mask"].sum())
    return dict(framework="prefjax", mode=mode, step_s=float(np.median(times)),
                step_s_all=times, real_tokens_per_s=real / sum(times),
                padding_fraction=float(np.mean([padding_fraction(b) for b in batches])),
                shapes=sorted(seen), compile_s=compile_s, xla_peak_bytes=int(peak_mem),
                max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                loss=float(m["loss"]))


def child(a, mode: str) -> dict:
    argv = [sys.executable, __file__, "--only", mode] + [
        x for x in sys.argv[1:] if not x.startswith("--only")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if p.returncode:
        raise SystemExit(f"prefjax {mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def trl_run(a, lengths_file: Path, padding_free: bool) -> dict:
    argv = [str(TRL_PY), str(HERE / "trl_dpo_ragged.py"), "--lengths", str(lengths_file),
            "--steps", str(a.trl_steps)] + [
        f"--{k}={getattr(a, k.replace('-', '_'))}" for k in (
            "hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "max-length",
            "pairs", "seed")]
    if padding_free:
        argv.append("--padding-free")
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode:
        err = p.stderr.strip().splitlines()
        return dict(framework="trl", mode="padding_free" if padding_free else "default",
                    error=err[-1] if err else f"exit {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    a = parse()
    if a.only:
        print(json.dumps(run_mode(a, a.only)))
        return
    sys.path.insert(0, str(HERE))
    import jax
    from _report import machine, write

    load0 = os.getloadavg()
    lengths = draw_lengths(a, a.pairs * a.batches)
    rows = [child(a, "padded"), child(a, "packed")]
    if not a.no_trl:
        if not TRL_PY.exists():
            raise SystemExit(f"{TRL_PY} missing: make bench-trl-env, or pass --no-trl")
        lf = Path(a.out).with_suffix(".lengths.json")
        lf.parent.mkdir(parents=True, exist_ok=True)
        lf.write_text(json.dumps(lengths))
        rows.append(trl_run(a, lf, False))
        if a.trl_padding_free:
            rows.append(trl_run(a, lf, True))
        lf.unlink()
    base = {r["mode"]: r for r in rows if r["framework"] == "prefjax"}
    trl_default = next((r for r in rows if r["framework"] == "trl" and r["mode"] == "default"
                        and "error" not in r), None)
    tot = np.asarray(lengths)
    print(f"\nDPO, {a.pairs} pairs/step, max_length {a.max_length}, real tokens/row mean "
          f"{(tot[:, 0] * 2 + tot[:, 1] + tot[:, 2]).mean() / 2:.0f} "
          f"(prompt median {np.median(tot[:, 0]):.0f}, response median "
          f"{np.median(tot[:, 1:]):.0f}); load avg {load0[0]:.1f}")
    print(f"{'row':<22}{'step s':>9}{'real tok/s':>12}{'pad frac':>10}{'max RSS MiB':>13}"
          f"{'XLA peak MiB':>14}{'vs padded':>11}")
    for r in rows:
        name = f"{r['framework']} {r['mode']}"
        if "error" in r:
            print(f"{name:<22} did not run: {r['error'][:90]}")
            continue
        pad = r.get("padding_fraction")
        xla = r.get("xla_peak_bytes")
        print(f"{name:<22}{r['step_s']:>9.3f}{r['real_tokens_per_s']:>12.0f}"
              f"{'' if pad is None else f'{pad:.2f}':>10}{r['max_rss_bytes'] / MiB:>13.0f}"
              f"{'' if xla is None else f'{xla / MiB:.0f}':>14}"
              f"{r['real_tokens_per_s'] / base['padded']['real_tokens_per_s']:>10.2f}x")
    speed = {"packed_vs_padded": base["packed"]["real_tokens_per_s"]
             / base["padded"]["real_tokens_per_s"]}
    if trl_default:
        speed["packed_vs_trl_default"] = (base["packed"]["real_tokens_per_s"]
                                          / trl_default["real_tokens_per_s"])
    print("speedups: " + ", ".join(f"{k} {v:.2f}x" for k, v in speed.items()))
    write(dict(machine=machine(load_avg_start=load0, load_avg_end=os.getloadavg(),
                               jax_devices=jax.device_count()),
               args=vars(a), lengths=lengths, rows=rows, speedups=speed), a.out)


if __name__ == "__main__":
    main()
