"""End to end against HF TRL: `python -m prefjax.main` and TRL's DPOTrainer, from the same HF
weights and jsonl, compute the same loss at every step (DPO with AdamW, IPO with plain SGD).

TRL runs in its own environment (benchmarks/.venv-trl), created with `make bench-trl-env` when
missing (tests/trl_env.py; it needs the package registries: CI has them, and without them the
test fails, saying so). The checkpoint is a tiny random Qwen2
(transformers + torch, `save_pretrained`) with a character-level tokenizer, the data 8 pairs of
short strings; configs/trl_parity.py and tests/trl_parity_worker.py hold the matched settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefjax.metrics import read_metrics
from tests.trl_env import trl_python

ROOT = Path(__file__).resolve().parents[1]
PAIRS, STEPS = 8, 6
# name -> prefjax config args and TRL's DPOConfig settings for the same run
RUNS = {
    "dpo": dict(algo="dpo", optimizer="adamw", lr=1e-3, beta=0.1,
                trl=dict(loss_type="sigmoid", optim="adamw_torch")),
    "ipo": dict(algo="ipo", optimizer="sgd", lr=0.05, beta=0.1,
                trl=dict(loss_type="ipo", optim="sgd")),
}
RTOL = 1e-4  # per-step loss, relative (the bound)

pytestmark = pytest.mark.slow


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n pairs of lowercase-word strings, every row well under the config's length limits."""
    r = np.random.default_rng(seed)
    words = lambda k: " ".join("".join(r.choice(list("abcdefghij"), r.integers(2, 5)))  # noqa: E731
                               for _ in range(k))
    rows = [{"prompt": words(int(r.integers(3, 7))),
             "chosen": " " + words(int(r.integers(1, 4))),
             "rejected": " " + words(int(r.integers(1, 4)))} for _ in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(TRL's interpreter, HF folder, jsonl)."""
    from tests.models.hf_fixtures import make_tiny_checkpoint

    python = trl_python()
    tmp = tmp_path_factory.mktemp("trl_parity")
    return (python, make_tiny_checkpoint("qwen2", tmp / "model"),
            write_pairs(tmp / "pairs.jsonl", PAIRS))


def trl_run(python: Path, name: str, model: Path, data: Path, tmp: Path) -> dict:
    """TRL's per-step results of run `name` (tests/trl_parity_worker.py)."""
    run = RUNS[name]
    spec = {"model": str(model), "data": str(data),
            "runs": {name: {**run["trl"], "beta": run["beta"], "lr": run["lr"], "steps": STEPS,
                            "pairs": PAIRS}}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([str(python), str(ROOT / "tests" / "trl_parity_worker.py"),
                        str(tmp / "spec.json"), str(tmp / "trl.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, f"TRL run failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads((tmp / "trl.json").read_text())[name]


def prefjax_cli(name: str, model: Path, data: Path, workdir: Path) -> list[dict]:
    """Every step's metrics record of `python -m prefjax.main` on configs/trl_parity.py."""
    run = RUNS[name]
    arg = (f"algo={run['algo']},optimizer={run['optimizer']},lr={run['lr']},beta={run['beta']},"
           f"steps={STEPS},pairs={PAIRS}")
    cmd = [sys.executable, "-m", "prefjax.main", f"--config={ROOT}/configs/trl_parity.py:{arg}",
           f"--workdir={workdir}", f"--config.model.source={model}",
           f"--config.data.source={data}", f"--config.data.eval_source={data}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, not the test process's eight
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, f"prefjax run failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    recs = [rec for rec in read_metrics(workdir) if "loss" in rec]
    assert [rec["step"] for rec in recs] == list(range(1, STEPS + 1))
    return recs


@pytest.mark.parametrize("name", list(RUNS))
def test_cli_matches_trl_step_by_step(setup, tmp_path, name):
    python, model, data = setup
    theirs = trl_run(python, name, model, data, tmp_path)
    recs = prefjax_cli(name, model, data, tmp_path / name)
    loss = np.array([rec["loss"] for rec in recs])
    np.testing.assert_allclose(loss, theirs["loss"], rtol=RTOL, err_msg=f"{name} loss")
    # the steps moved the policy: a parity of six identical losses would prove little
    assert abs(loss[-1] - loss[0]) > 1e-2 * abs(loss[0]), loss
    for key in ("logps/chosen", "logps/rejected"):
        np.testing.assert_allclose([rec[key] for rec in recs], theirs[key], rtol=RTOL,
                                   err_msg=f"{name} {key}")
    # step 1's margins are 0 on both sides (policy = reference): compare on the scale of later
    margins = np.array([rec["rewards/margins"] for rec in recs])
    np.testing.assert_allclose(margins, theirs["rewards/margins"], rtol=0,
                               atol=RTOL * max(np.abs(margins).max(), 1e-3),
                               err_msg=f"{name} margins")
    np.testing.assert_allclose([rec["grad_norm"] for rec in recs], theirs["grad_norm"],
                               rtol=1e-3, err_msg=f"{name} grad_norm")
