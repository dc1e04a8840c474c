"""The notebooks run top to bottom on a tiny run: SFT smoke, then two DPO smokes from its export."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from prefjax.config import lock  # noqa: E402
from prefjax.main import run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "prefjax-test"
KERNEL_ENV = {  # the kernel also inherits this process's environment
    "MPLBACKEND": "Agg",
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}


def load_config(name: str, arg: str):
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lock(mod.get_config(arg))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """sft (random init), dpo (beta 0.1) and dpo_sampled (beta 0.3, eval.sample) from sft."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("sft", "dpo", "dpo_sampled")}
    run(load_config("sft_synthetic", "smoke"), str(out["sft"]))
    for name, beta in (("dpo", 0.1), ("dpo_sampled", 0.3)):
        c = load_config("dpo_synthetic", f"smoke,beta={beta}")
        c.model.init_from = str(out["sft"])  # smoke alone starts from a random init
        c.eval.sample = name == "dpo_sampled"  # logs eval/sample/{kl,reward} per eval step
        run(c, str(out[name]))
    # what a frontier experiment may leave in a run directory
    (out["dpo_sampled"] / "frontier.csv").write_text("kl_coef,kl,reward\n0.1,0.5,0.9\n1,0.1,0.8\n")
    return out


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    """A kernelspec running this interpreter (the venv's), found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "prefjax tests", "language": "python", "env": KERNEL_ENV}))
    return root


def execute(name: str, params: dict, jupyter_path: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run notebooks/`name` with `params` assigned after its "parameters" cell (papermill-like)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# injected by tests/test_notebooks.py\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items())
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def text_of(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def assert_png(path: Path) -> None:
    assert path.exists(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000, path


@pytest.mark.parametrize("name", ["explore_run.ipynb", "compare_runs.ipynb"])
def test_notebook_is_committed_clean_with_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    assert "parameters" in code[0].metadata.get("tags", [])


def test_explore_run(runs, jupyter_path, monkeypatch, tmp_path):
    out = tmp_path / "explore"
    nb = execute("explore_run.ipynb", {"WORKDIR": str(runs["dpo"]), "NUM_SHOW": 3,
                                       "NUM_EVAL": 16, "OUT": str(out)}, jupyter_path, monkeypatch)
    assert_png(out / "curves.png")
    assert_png(out / "token_rewards.png")  # a held-out pair coloured by per-token reward
    table = json.loads((out / "sample_metrics.json").read_text())
    assert set(table) == {"policy", "reference"}  # the reference is the SFT run (init_from)
    assert -0.5 <= table["policy"]["reward"] <= 1.25
    assert math.isfinite(table["policy"]["kl"])
    assert table["reference"]["kl"] == 0.0
    text = text_of(nb)
    assert "target:" in text and "r* =" in text and "rewards/accuracies" in text


def test_compare_runs(runs, jupyter_path, monkeypatch, tmp_path):
    out = tmp_path / "compare"
    nb = execute("compare_runs.ipynb", {"WORKDIRS": [str(p) for p in runs.values()],
                                        "NUM_EVAL": 16, "OUT": str(out)}, jupyter_path, monkeypatch)
    assert_png(out / "curves.png")
    assert_png(out / "frontier.png")
    with open(out / "runs.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"sft", "dpo", "dpo_sampled", "reference: sft"}
    assert rows["dpo"]["label"] == "dpo beta=0.1" and rows["dpo_sampled"]["label"] == "dpo beta=0.3"
    for name in ("dpo", "dpo_sampled"):
        assert math.isfinite(float(rows[name]["sampled KL"]))
        assert -0.5 <= float(rows[name]["sampled reward"]) <= 1.25
    assert rows["sft"]["sampled KL"] == "nan"  # random init: no reference to measure against
    # the SFT export measured as a run (no reference) and as the DPO runs' reference agree
    assert rows["sft"]["sampled reward"] == rows["reference: sft"]["sampled reward"]
    # 2 DPO runs (SFT has no KL), the SFT reference, 2 evals of dpo_sampled, its frontier.csv
    assert ("drawn: 2 runs, 2 per-step evals, 2 frontier.csv points, 1 references"
            in text_of(nb))
