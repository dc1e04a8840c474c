"""Offline trainers end to end: configs load and lock, reference modes agree, SIGKILL resume."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prefjax.config import lock
from prefjax.main import run
from prefjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def load_config(path: Path, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lock(mod.get_config(arg))


def resume_config(name: str = "dpo_synthetic"):
    c = load_config(ROOT / "configs" / f"{name}.py", "smoke")
    c.train.num_steps = 24
    c.train.log_every = 3  # windows straddle checkpoints: the partial window must resume too
    c.train.eval_every = 8
    c.train.save_every = 4
    c.train.keep_checkpoints = 10
    return c


def training_records(workdir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in read_metrics(workdir)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_locked_with_and_without_smoke(path):
    for arg in (None, "smoke"):
        c = load_config(path, arg)
        with pytest.raises(AttributeError):
            c.train.not_a_field = 1  # locked: unknown fields fail
        if arg == "smoke":
            assert c.train.num_steps <= 6


def test_cli_rejects_unknown_field_and_wrong_type(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cfg = f"--config={ROOT / 'configs' / 'dpo_synthetic.py'}:smoke"
    for override, needle in (("--config.train.lrr=0.1", "lrr"),
                             ("--config.train.lr=abc", "lr")):
        p = subprocess.run([sys.executable, "-m", "prefjax.main", cfg, override,
                            f"--workdir={tmp_path}"], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode != 0
        assert needle in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()  # failed at start, before any training


def assert_same_training(want: list[dict], got: list[dict]) -> None:
    """Two runs logged every step give the same metrics (1e-5). Except `rewards/accuracies`
    while the policy is still the reference (every step before the first nonzero learning
    rate, warmup starting at 0): each margin is then a tie, exactly 0 from one reference and
    ~1e-8 of either sign from another summation order, so any number of pairs may count. Once
    the policy has moved, at most one pair of 8 may sit within rounding of 0."""
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, len(want) + 1))
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.keys() == b.keys()
        moved = any(r["learning_rate"] > 0 for r in want[:i])
        for k in a:
            if k.endswith("rewards/accuracies"):
                assert not moved or abs(b[k] - a[k]) <= 1 / 8 + 1e-9, (a["step"], k)
                continue
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_live_reference_equals_precomputed(tmp_path):
    out = {}
    for mode in ("precomputed", "live"):
        c = load_config(ROOT / "configs" / "dpo_synthetic.py", "smoke")
        c.reference.mode = mode
        c.train.export_hf = False
        c.train.log_every = 1
        run(c, str(tmp_path / mode))
        out[mode] = training_records(tmp_path / mode)
    assert len(out["live"]) >= 3
    assert_same_training(out["precomputed"], out["live"])


def test_reference_mode_none_is_rejected_for_dpo(tmp_path):
    c = load_config(ROOT / "configs" / "dpo_synthetic.py", "smoke")
    c.reference.mode = "none"
    with pytest.raises(ValueError, match="reference"):
        run(c, str(tmp_path))


def check_sigkill_resume(tmp_path, name: str) -> None:
    """Run `name` uninterrupted; run it again, SIGKILL it after checkpoint 12, re-run: the
    resumed run's metrics (timings aside) equal the uninterrupted run's."""
    full = tmp_path / "full"
    run(resume_config(name), str(full))
    expected = training_records(full)
    assert expected[-1]["step"] == 24

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.train.resume_worker", str(killed)]
    proc = subprocess.Popen([*cmd, "0.15", name], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # kill once a middle checkpoint is complete (Orbax renames the tmp dir when done)
    while not (killed / "checkpoints" / "12").is_dir():
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint for step 12 within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    partial = read_metrics(killed)
    assert partial and partial[-1]["step"] < 24, "the run finished before it could be killed"

    p = subprocess.run([*cmd, "0", name], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", p.stderr)
    assert resumed and 12 <= int(resumed.group(1)) < 24, p.stderr[-3000:]
    got = training_records(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {a['step']} {k}")


def test_sigkill_mid_run_then_rerun_reproduces_uninterrupted_metrics(tmp_path):
    check_sigkill_resume(tmp_path, "dpo_synthetic")


def write_hh(path: Path, n: int, seed: int = 0) -> Path:
    """An Anthropic-HH-format jsonl: two transcripts per row sharing the human turn."""
    import json

    r = np.random.default_rng(seed)
    words = ["cat", "dog", "sun", "tree", "blue", "fast", "home", "rain"]
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(r.choice(words, 4))
            a, b = (" ".join(r.choice(words, r.integers(1, 4))) for _ in range(2))
            if a == b:
                b = b + " no"
            base = f"\n\nHuman: {q}?\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{base} {a}", "rejected": f"{base} {b}"}) + "\n")
    return path


@pytest.mark.parametrize("name", ["dpo_hh", "mpo_hh", "dpo_lora_hh"])
def test_hh_configs_train_a_local_hf_model_on_local_hh_data(tmp_path, name):
    from tests.models.hf_fixtures import make_tiny_checkpoint

    model = make_tiny_checkpoint("qwen2", tmp_path / "model")
    data = write_hh(tmp_path / "hh.jsonl", 96)
    c = load_config(ROOT / "configs" / f"{name}.py", "smoke")
    c.model.source = str(model)
    c.data.source = str(data)
    c.data.eval_fraction = 0.25
    c.model.logps_chunk = 64  # exercises the chunked log-softmax (vocab 160)
    metrics = run(c, str(tmp_path / "run"))
    assert np.isfinite(metrics["loss"])
    recs = read_metrics(tmp_path / "run")
    assert recs[-1]["step"] == c.train.num_steps
    if name == "mpo_hh":  # stage 1 sampled reference responses from the HF model
        assert (tmp_path / "run" / "ref_samples" / "dataset_info.json").exists()
    from prefjax.models.hf import load_hf

    exported, tok = load_hf(tmp_path / "run" / "export")
    assert tok is not None and exported.config.vocab_size == 160
    if name == "dpo_lora_hh":  # merged export and a PEFT adapter folder over the HF base
        config = json.loads((tmp_path / "run" / "export_adapter" / "adapter_config.json")
                            .read_text())
        assert config["base_model_name_or_path"] == str(model) and config["r"] == 16


def test_unknown_config_argument_fails_naming_it():
    with pytest.raises(ValueError, match="'bta'"):
        load_config(ROOT / "configs" / "dpo_synthetic.py", "bta=0.3")
