"""The TPU fit-check (`python -m prefjax.plan`): a tiny config compiled for abstract v5e chips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# the fit-check needs the TPU compiler; libtpu is in the `test` extra, so a missing one fails here
import libtpu  # noqa: E402, F401
import pytest

from prefjax import plan  # noqa: E402
from prefjax.config import base_config  # noqa: E402
from prefjax.data import synthetic as syn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_params(v: int, d: int, f: int, layers: int, h: int, k: int) -> int:
    """Closed-form parameter count of an untied Llama (no biases)."""
    hd = d // h
    attn = d * h * hd * 2 + d * k * hd * 2  # q, o; k, v
    block = attn + 3 * d * f + 2 * d  # gate, up, down; two RMSNorm scales
    return 2 * v * d + layers * block + d  # embedding + lm_head, final norm


def test_cli_compiles_live_reference_step_for_v5e_2x2(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "prefjax.plan",
           f"--config={ROOT / 'configs' / 'dpo_fit_check.py'}:smoke",
           "--config.model.remat=False", "--topology=v5e:2x2", f"--json={out}",
           "--config.data.max_length=1024"]  # at 512 tokens all temporaries fit on-chip (0 HBM)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FITS" in p.stdout and "temporaries" in p.stdout, p.stdout
    r = json.loads(out.read_text())

    assert (r["devices"], r["chips"], r["chip"]) == (4, 4, "TPU v5 lite")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["config"]["reference"] == "live"
    c = base_config()  # the smoke shapes: 1 layer, d 32, f 64, 8 pairs
    n = tiny_llama_params(len(syn.make_tokenizer()), 32, 64, 1, c.model.num_heads,
                          c.model.num_kv_heads)
    assert r["params"] == {"trainable": n, "frozen": n}  # the live reference: same shape
    assert r["shapes"]["rows"] == 16 and r["shapes"]["seq"] == 1024

    mem = r["memory"]
    assert mem["temporaries"] > 0 and mem["generated_code"] > 0
    # per device at least: float32 params + AdamW mu, nu + the frozen reference, split over
    # fsdp=4 (the batch, replicated norm scales and TPU tile padding come on top: each array's
    # two minor dims are padded to (8, 128), so these 8-wide shards take up to 16x their size)
    state = 4 * n * 4 / 4
    assert state <= mem["arguments"] <= 16 * state
    assert mem["alias"] >= 3 * n * 4 / 4  # the donated trainable state is updated in place
    assert mem["total"] == (mem["arguments"] + mem["outputs"] - mem["alias"]
                            + mem["temporaries"] + mem["generated_code"])
    assert r["hbm"]["per_device"] == 16 * 2**30 and r["fits"]

    # model FLOPs (6N + 12LTHQ per trained token, 2N + 4LTHQ per reference token) against
    # the compiler's own count of the partitioned step (elementwise ops on top, some attention
    # blocks it can skip)
    xla = r["flops"]["xla_per_device"] * r["devices"]
    assert 0.8 < xla / r["flops"]["model_per_step"] < 1.25, (xla, r["flops"])
    assert r["flops"]["reference_forward"] * 3 == pytest.approx(r["flops"]["policy_train"])


@pytest.mark.parametrize("name, needle", [
    ("v9z:2x2", "unknown TPU topology 'v9z:2x2'"),
    ("v5e", "unknown TPU topology 'v5e'"),
    ("v5e:3x3", "TPU topology 'v5e:3x3' rejected by libtpu"),
])
def test_bad_topology_fails_naming_it(name, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        plan.topology_devices(name)


def test_topology_devices_count_chips_and_cores():
    devices, chip, chips = plan.topology_devices("v5e:2x4")
    assert (len(devices), chips, chip.hbm_gib) == (8, 8, 16)
    devices, chip, chips = plan.topology_devices("v5p:2x2x1")
    assert (len(devices), chips, chip.hbm_gib) == (4, 4, 95)


def test_compiler_oom_message_figures():
    g = 2**30
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (23.23G) exceeds available HBM (15.75G).")
    assert plan.oom_figures(msg) == {"temporaries": 23.23 * g, "compiler_limit": 15.75 * g}
    msg = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Used 20.5G of 15.75G hbm."
    assert plan.oom_figures(msg) == {"total": 20.5 * g, "compiler_limit": 15.75 * g}
    assert plan.oom_figures("INTERNAL: something else") == {}


def test_cpu_topology_compiles_for_this_hosts_devices():
    """`cpu:N`: the same plan on this host's CPU devices (what benchmarks/step_memory.py uses);
    the state is float32 params + two AdamW moments + the live reference, donated in place."""
    sys.path.insert(0, str(ROOT))
    from configs.dpo_fit_check import get_config

    r = plan.plan(get_config("smoke"), "cpu:1")
    assert (r["devices"], r["chip"]) == (1, "cpu") and r["flops"]["seconds_at_peak"] is None
    n = r["params"]["trainable"]
    mem = r["memory"]
    assert mem["arguments"] >= 4 * n * 4 and mem["alias"] >= 3 * n * 4
    assert r["fits"] and "step at peak" not in plan.format_table(r)
    with pytest.raises(ValueError, match="this process has [0-9]+ CPU devices"):
        plan.topology_devices("cpu:64")
