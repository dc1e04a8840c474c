"""Run code in HF TRL's own environment (benchmarks/.venv-trl: TRL 1.16 + torch), for parity
tests against TRL's functions on identical tensors.

`trl_python()` is that env's interpreter, built with `make bench-trl-env` when missing (a test
that needs TRL fails, naming the command, if it cannot be built). `run_in_trl(code, **arrays)`
runs `code` there in a subprocess: the arrays arrive as NumPy arrays in the dict `inputs`, and
`code` puts NumPy arrays (or numbers) into the dict `outputs`, which comes back.

TRL 1.16 no longer ships PPO (not even in `trl.experimental`); `legacy_trl_source(path)` reads a
file of the last release that has it (TRL 0.24.0, its wheel fetched once into the env with
`pip download --no-deps`), so a test can run that code in the TRL env without installing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import subprocess
import tempfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "benchmarks" / ".venv-trl"
LEGACY_TRL = "0.24.0"  # the last TRL release with PPOTrainer

_PRELUDE = """
import sys
import numpy as np
_d = np.load(sys.argv[1])
inputs = {k: _d[k] for k in _d.files}
outputs = {}
"""
_EPILOGUE = """
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in outputs.items()})
"""


@contextlib.contextmanager
def _env_lock():
    """One builder at a time across pytest workers: without it a second worker sees the
    half-made venv's `bin/python` and runs its `pip` before the first has installed it."""
    key = hashlib.sha1(str(TRL_VENV.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"prefjax-trl-env-{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def trl_python() -> Path:
    """The TRL env's python, building the env first when its stamp file is missing."""
    py = TRL_VENV / "bin" / "python"
    with _env_lock():
        if not (TRL_VENV / ".trl").exists() or not py.exists():
            p = subprocess.run(["make", "bench-trl-env"], cwd=ROOT, capture_output=True,
                               text=True, timeout=3600)
            if p.returncode != 0:
                raise RuntimeError("the TRL environment is missing and `make bench-trl-env` "
                                   f"failed (it needs the package index):\n{p.stdout[-2000:]}\n"
                                   f"{p.stderr[-2000:]}")
    return py


def run_in_trl(code: str, timeout: float = 600, **arrays) -> dict[str, np.ndarray]:
    """Run `code` in the TRL env with `inputs` (the arrays) and return its `outputs`."""
    py = trl_python()
    with tempfile.TemporaryDirectory() as tmp:
        src, inp, out = Path(tmp) / "run.py", Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        src.write_text(_PRELUDE + textwrap.dedent(code) + _EPILOGUE)
        np.savez(inp, **{k: np.asarray(v) for k, v in arrays.items()})
        p = subprocess.run([str(py), str(src), str(inp), str(out)], capture_output=True,
                           text=True, timeout=timeout,
                           env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                "CUDA_VISIBLE_DEVICES": ""})
        if p.returncode != 0:
            raise RuntimeError(f"code in the TRL env failed:\n{p.stderr[-4000:]}")
        d = np.load(out)
        return {k: d[k] for k in d.files}


def legacy_trl_source(path: str) -> str:
    """The text of `path` (e.g. "trl/trainer/ppo_trainer.py") in the TRL 0.24.0 wheel."""
    folder = TRL_VENV / "legacy"
    wheel = folder / f"trl-{LEGACY_TRL}-py3-none-any.whl"
    py = trl_python()
    with _env_lock():
        if not wheel.exists():
            p = subprocess.run([str(py), "-m", "pip", "download", "-q", "--no-deps",
                                f"trl=={LEGACY_TRL}", "-d", str(folder)],
                               capture_output=True, text=True, timeout=600)
            if p.returncode != 0 or not wheel.exists():
                raise RuntimeError(f"could not fetch the TRL {LEGACY_TRL} wheel (it needs the "
                                   f"package index):\n{p.stderr[-2000:]}")
    with zipfile.ZipFile(wheel) as z:
        return z.read(path).decode()
