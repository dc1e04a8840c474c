"""`python -m prefjax.plan --config=configs/X.py[:arg] --topology=v5e:4x4 [--json=PATH]`.

Will a config's train step fit a TPU slice? On any machine with `pip install "prefjax[tpu]"`
(libtpu, no TPU needed), this AOT-compiles the exact step of the config (model from its
config.json alone, no weights; an abstract batch of the configured shapes) for the abstract
devices of a TPU topology, and reports the TPU compiler's per-device memory, whether it fits the
chip's HBM, the parameter count and the model FLOPs per step. docs/fit_check.md explains the
numbers. `plan(config, topology)` is the same as a function. `--topology=cpu:N` compiles for
this host's first N CPU devices instead (host RAM as the budget): what the step needs here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import ConfigDict, config_flags

from prefjax import losses, parallel, plan_shapes
from prefjax.losses import records
from prefjax.train.build import make_optimizer
from prefjax.train.reference import POLICY_PARAMS, WithReference, live_reference_forward
from prefjax.train.state import abstract_train_state, state_shardings
from prefjax.train.step import build_train_step

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. Sources: the Cloud TPU system-architecture pages
    (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): HBM per chip and peak bf16 FLOP/s."""

    device_kind: str  # jax's `device.device_kind`
    hbm_gib: float  # per chip (shared by its TensorCores when each is a device)
    peak_tflops: float  # bf16, per chip


CHIPS = {
    "v4": Chip("TPU v4", 32, 275),
    "v5e": Chip("TPU v5 lite", 16, 197),
    "v5p": Chip("TPU v5", 95, 459),
    "v6e": Chip("TPU v6 lite", 32, 918),
}
# The compiler and runtime keep part of HBM for themselves; a step that needs more than this
# share of a device's HBM is reported as not fitting even when the compiler accepts it.
USABLE_FRACTION = 0.95
_TOPOLOGY = re.compile(r"^(v\d+[a-z]?)[:\-]([0-9x]+)$")


def topology_devices(name: str) -> tuple[list, Chip, int]:
    """`(abstract TPU devices, chip, chips)` of topology `name` ("v5e:4x4"), from libtpu.

    Works without a TPU: the devices can only be compiled for. Fails naming the topology when
    the generation is unknown, libtpu is missing, or libtpu rejects the shape.
    """
    if name.strip().startswith("cpu:"):
        return _cpu_devices(name.strip())
    m = _TOPOLOGY.match(name.strip())
    if m is None or m.group(1) not in CHIPS:
        raise ValueError(
            f"unknown TPU topology {name!r}: use GENERATION:SHAPE with a generation in "
            f"{sorted(CHIPS)} and chips per dimension, e.g. v5e:2x2 (v5e-4), v5e:4x8 (v5e-32), "
            "v5p:4x4x4 (v5p-128), v6e:4x4")
    chip = CHIPS[m.group(1)]
    try:
        import libtpu  # noqa: F401  (the TPU compiler; only its presence is checked here)
    except ImportError as e:
        raise ImportError(
            f"the fit-check for {name!r} needs the TPU compiler: pip install \"prefjax[tpu]\" "
            "(jax[tpu] at prefjax's jax version, libtpu ~700 MB; no TPU needed)") from e
    # libtpu takes a machine-wide lock file when it loads; compiling needs no exclusive TPU,
    # so let several processes (tests, other runs) load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=name.strip(), platform="tpu")
    except Exception as e:  # libtpu raises JaxRuntimeError INVALID_ARGUMENT for bad shapes
        raise ValueError(f"TPU topology {name!r} rejected by libtpu: {e}") from e
    devices = list(desc.devices)
    chips = len({tuple(d.coords) for d in devices})
    return devices, chip, chips


def _cpu_devices(name: str) -> tuple[list, Chip, int]:
    """`cpu:N`: this host's first N CPU devices, with the host's RAM as the "HBM" (what the same
    step needs when it runs here; N > 1 needs XLA_FLAGS=--xla_force_host_platform_device_count).
    """
    try:
        n = int(name.split(":", 1)[1])
    except ValueError as e:
        raise ValueError(f"topology {name!r}: expected cpu:N with N an int") from e
    devices = jax.devices("cpu")
    if not 1 <= n <= len(devices):
        raise ValueError(f"topology {name!r}: this process has {len(devices)} CPU devices; "
                         "simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "set before jax is imported")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return devices[:n], Chip("cpu", ram, 0.0), 1


def _reference_mode(c: ConfigDict, rec, hp: dict) -> str:
    """"live", "precomputed" or "none": what the step reads the reference log-probs from."""
    mode = c.reference.mode
    if mode not in ("precomputed", "live", "none"):
        raise ValueError(f"reference.mode must be precomputed | live | none, got {mode!r}")
    if not rec.needs_reference(hp):
        return "none"
    if mode == "none":
        raise ValueError(f"algo {c.algo!r} with loss {hp} needs reference log-probs but "
                         "reference.mode='none'")
    return mode


def _frozen_dtype(c: ConfigDict):
    name = c.reference.get("param_dtype", "")
    table = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in table:
        raise ValueError(f"reference.param_dtype must be one of {list(table)}, got {name!r}")
    return table[name]


def _cast_floats(tree: Any, dtype) -> Any:
    def cast(s):
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(s.shape, dtype)
        return s

    return jax.tree.map(cast, tree)


def _compiling_for_tpu():
    from prefjax.models import attention

    hook = getattr(attention, "compiling_for", None)
    return hook("tpu") if hook is not None else contextlib.nullcontext()


def _lower(step, state, batch):
    """`step.lower(state, batch)`, or the same jit `_ShardedCall.__call__` would make."""
    if hasattr(step, "lower"):
        return step.lower(state, batch)
    jitted = jax.jit(step.fn, in_shardings=(step.state_shardings,
                                            parallel.batch_shardings(batch, step.mesh)),
                     out_shardings=(step.state_shardings, step.replicated),
                     donate_argnums=(0,) if step.donate else ())
    with jax.set_mesh(step.mesh):
        return jitted.lower(state, batch)


_SIZE = r"([\d.]+)([KMGT])"
_OOM = (  # the TPU compiler's out-of-memory messages -> (first figure, second figure) names
    (re.compile(rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
     ("temporaries", "compiler_limit")),
    (re.compile(rf"Used {_SIZE} of {_SIZE} hbm"), ("total", "compiler_limit")),
)


def oom_figures(message: str) -> dict[str, float]:
    """Bytes the TPU compiler names in its out-of-memory error, e.g. "the total memory required
    for HLO temporaries (23.23G) exceeds available HBM (15.75G)" -> temporaries, compiler_limit."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern, names in _OOM:
        m = pattern.search(message)
        if m:
            return {names[0]: float(m.group(1)) * scale[m.group(2)],
                    names[1]: float(m.group(3)) * scale[m.group(4)]}
    return {}


def plan(config: ConfigDict, topology: str) -> dict:
    """Compile `config`'s train step for `topology`; per-device memory, fit, params, FLOPs.

    Returns a JSON-able dict: topology, chip, devices, mesh, model, shapes (rows, seq, grad
    accumulation), params (trainable, frozen), flops (model FLOPs per step: policy training +
    frozen reference forward; and XLA's count of the compiled step, remat included), memory
    (bytes per device: arguments, outputs, alias, temporaries, generated code, total), hbm
    (bytes per device, usable share), fits, compile_seconds. A step the compiler cannot fit
    in HBM gives fits False and the compiler's message in `error`.
    """
    c = config
    devices, chip, chips = topology_devices(topology)
    rec = records.get(c.algo)
    hp = c.loss.to_dict()
    loss = losses.get(rec.loss, **hp)
    mode = _reference_mode(c, rec, hp)
    make_decoder, dcfg, source = plan_shapes.decoder_fn(c)
    batch = plan_shapes.abstract_batch(c, rec, ref_column=mode == "precomputed")
    mesh = parallel.make_mesh(c.mesh, devices=devices)
    rules = parallel.rules_for(c.mesh.strategy)
    optimizer = make_optimizer(c.train)
    chunk = c.model.logps_chunk or None

    make, trainable = make_decoder, nnx.Param
    forward = lambda model, b: _policy_out(model, b, chunk)  # noqa: E731
    if rec.head == "reward":
        from prefjax.models.heads import RewardModel

        make = lambda rngs: RewardModel(make_decoder(rngs), rngs=rngs)  # noqa: E731
    elif rec.head is not None:
        raise NotImplementedError(f"algo {c.algo!r}: a {rec.head!r} head is not fit-checked")
    if mode == "live":
        # the reference has the policy's shape unless reference.source names another model
        make_ref = make_decoder
        if c.reference.source:
            ref_c = ConfigDict(c.to_dict())
            ref_c.model.init_from, ref_c.model.source = "", c.reference.source
            make_ref = plan_shapes.decoder_fn(ref_c)[0]
        make = lambda rngs: WithReference(make_decoder(rngs), make_ref(rngs))  # noqa: E731
        forward, trainable = live_reference_forward(chunk), POLICY_PARAMS

    abstract = abstract_train_state(make, optimizer, seed=c.seed, trainable=trainable)
    frozen_dtype = _frozen_dtype(c)
    if mode == "live" and frozen_dtype is not None:
        abstract = abstract.replace(rest=_cast_floats(abstract.rest, frozen_dtype))
    shardings = state_shardings(abstract, mesh, rules)
    tail = plan_shapes.sequence_rows(c, rec)[2]
    step = build_train_step(
        loss, optimizer, mesh=mesh, state_shardings=shardings, forward=forward,
        grad_accum=c.train.grad_accum, max_grad_norm=c.train.max_grad_norm,
        paired=rec.paired, process_blocks=1, **({"tail_key": tail} if tail else {}))

    t0 = time.perf_counter()
    on_tpu = chip.device_kind != "cpu"
    with _compiling_for_tpu() if on_tpu else contextlib.nullcontext():  # TPU-only kernels
        # (splash attention) trace on this CPU host
        lowered = _lower(step, abstract, batch)
    t1 = time.perf_counter()
    error = None
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e) and "hbm" not in str(e).lower():
            raise
        compiled, error = None, str(e)
    seconds = {"lower": round(t1 - t0, 1), "compile": round(time.perf_counter() - t1, 1)}

    n_dev = len(devices)
    hbm = chip.hbm_gib * GIB * chips / n_dev
    policy_params = plan_shapes.count(abstract.params)
    frozen_params = plan_shapes.count(abstract.rest)
    b, t = batch["input_ids"].shape
    layers, width = plan_shapes.attention_dims(dcfg)
    train_flops = plan_shapes.model_flops(
        matmul_params=plan_shapes.matmul_params(abstract.params), tokens=b * t, seq=t,
        layers=layers, attn_width=width, backward=True)
    ref_flops = 0.0
    if mode == "live":  # the frozen reference runs forward only
        ref_flops = plan_shapes.model_flops(
            matmul_params=plan_shapes.matmul_params(abstract.rest), tokens=b * t, seq=t,
            layers=layers, attn_width=width, backward=False)
    total_flops = train_flops + ref_flops
    out: dict[str, Any] = {
        "config": {"algo": c.algo, "reference": mode, "model": source,
                   "dtype": c.model.dtype, "remat": bool(c.model.remat),
                   **{k: c.model[k] for k in plan_shapes.LAYER_OPTIONS if k in c.model},
                   "logps_chunk": c.model.logps_chunk,
                   "moment_dtype": c.train.get("moment_dtype", "float32"),
                   "reference_param_dtype": c.reference.get("param_dtype", "")},
        "topology": topology, "chip": chip.device_kind, "chips": chips, "devices": n_dev,
        "mesh": dict(mesh.shape), "strategy": c.mesh.strategy,
        "shapes": {"rows": b, "seq": t, "grad_accum": c.train.grad_accum,
                   "pairs": c.train.batch_size if rec.paired else None},
        "params": {"trainable": policy_params, "frozen": frozen_params},
        "flops": {"model_per_step": total_flops, "policy_train": train_flops,
                  "reference_forward": ref_flops,
                  "seconds_at_peak": (total_flops / (chip.peak_tflops * 1e12 * chips)
                                      if chip.peak_tflops else None)},
        "hbm": {"per_device": hbm, "usable": hbm * USABLE_FRACTION},
        "compile_seconds": seconds,
    }
    if compiled is None:
        out.update(fits=False, error=error[:20000], memory=oom_figures(error) or None)
        return out
    mem = compiled.memory_analysis()
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "alias": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes",
              "generated_code": "generated_code_size_in_bytes"}
    memory = {k: int(getattr(mem, f)) for k, f in fields.items()}
    # donated state: outputs reuse the argument buffers (alias), counted once
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["alias"]
                       + memory["temporaries"] + memory["generated_code"])
    host = {k: int(getattr(mem, "host_" + f, 0)) for k, f in fields.items()}
    if any(host.values()):
        memory["host"] = host
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    xla = float(cost.get("flops", 0.0)) if cost else 0.0
    out["flops"]["xla_per_device"] = xla
    out.update(memory=memory, fits=memory["total"] <= hbm * USABLE_FRACTION, error=None)
    return out


def _policy_out(model, batch, chunk):
    from prefjax.lm import policy_out

    return policy_out(model, batch, chunk_size=chunk)


def _bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{int(x)} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def format_table(r: dict) -> str:
    """The human-readable report of a `plan` result."""
    c, s, p, f = r["config"], r["shapes"], r["params"], r["flops"]
    mem = r.get("memory") or {}
    rows = [
        ("topology", f"{r['topology']} ({r['chips']} x {r['chip']}, {r['devices']} devices)"),
        ("mesh", " ".join(f"{k}={v}" for k, v in r["mesh"].items()) + f" ({r['strategy']})"),
        ("model", c["model"]),
        ("step", f"{c['algo']}, reference {c['reference']}, {s['rows']} rows x {s['seq']} tokens"
                 f", grad_accum {s['grad_accum']}, {c['dtype']} compute, remat {c['remat']}"),
        ("params", f"{_count(p['trainable'])} trainable, {_count(p['frozen'])} frozen"),
        ("model FLOPs/step", f"{f['model_per_step']:.3e} (policy training "
                             f"{f['policy_train']:.3e}, reference forward "
                             f"{f['reference_forward']:.3e})"),
    ]
    if f["seconds_at_peak"] is not None:
        rows.append(("step at peak", f"{f['seconds_at_peak']:.3f} s at 100% of "
                                     f"{CHIPS_BY_KIND.get(r['chip'], 0)} TFLOP/s per chip"))
    if "xla_per_device" in f:
        note = ("loop bodies counted once: scanned layers and grad_accum undercount"
                if c.get("scan_layers") or s["grad_accum"] > 1 else "incl. remat recompute")
        rows.append(("XLA FLOPs/step", f"{f['xla_per_device'] * r['devices']:.3e} "
                                       f"(compiled; {note})"))
    rows += [("per device", "")]
    for k in ("arguments", "outputs", "alias", "temporaries", "generated_code",
              "compiler_limit"):
        if k in mem:
            rows.append((f"  {k}", _bytes(mem[k])))
    rows.append(("  total", _bytes(mem.get("total"))))
    rows.append(("  HBM", f"{_bytes(r['hbm']['per_device'])} (usable "
                          f"{_bytes(r['hbm']['usable'])})"))
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    if mem.get("total"):
        verdict += f" ({100 * mem['total'] / r['hbm']['per_device']:.0f}% of HBM)"
    rows.append(("fits", verdict))
    rows.append(("compile", "{lower} s to lower, {compile} s to compile".format(
        **r["compile_seconds"])))
    if r.get("error"):
        rows.append(("compiler", r["error"].splitlines()[0][:300]))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


CHIPS_BY_KIND = {chip.device_kind: chip.peak_tflops for chip in CHIPS.values()}


def cli() -> None:
    """The command line: flags are defined here, so importing this module defines none."""
    config = config_flags.DEFINE_config_file(
        "config", None, "experiment config file (configs/*.py), optionally with :arg",
        lock_config=True)
    topology = flags.DEFINE_string(
        "topology", None, "TPU topology, e.g. v5e:2x2, v5e:4x8, v5p:4x4x4, v6e:4x4, v4:2x2x2; "
        "or cpu:N (this host's first N CPU devices)")
    out = flags.DEFINE_string("json", None, "also write the result as JSON to this path")
    flags.mark_flags_as_required(["config", "topology"])

    def main(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        # compile-only: never start a local accelerator runtime (the TPU devices are abstract)
        jax.config.update("jax_platforms", "cpu")
        r = plan(config.value, topology.value)
        print(format_table(r))
        if out.value:
            with open(out.value, "w") as fh:
                json.dump(r, fh, indent=2)

    app.run(main)


if __name__ == "__main__":
    cli()
