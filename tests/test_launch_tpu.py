"""experiments/launch_tpu.sh: the dry run prints one gcloud command that starts prefjax.main with
the given config on every TPU host; missing settings fail before anything runs."""

import os
import pathlib
import shlex
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "launch_tpu.sh"
ENV = {"TPU_NAME": "pod-a", "ZONE": "us-central2-b", "PROJECT": "proj-1",
       "CONFIG": "configs/dpo_synthetic.py", "WORKDIR": "gs://bucket/runs/dpo"}


def launch(*args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ENV and k not in ("REPO_DIR",
                                                                               "PYTHON")}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_dry_run_prints_the_command():
    r = launch("--dry-run", "--", "--config.train.num_steps=10", **ENV)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)  # the printed line is valid shell: one word per argument
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert {"--worker=all", "--zone=us-central2-b", "--project=proj-1"} <= set(argv)
    remote = shlex.split(next(a for a in argv if a.startswith("--command=")).split("=", 1)[1])
    assert remote[:4] == ["cd", "~/prefjax", "&&", ".venv/bin/python"]
    # --distributed: prefjax.main calls jax.distributed.initialize() (TPU autodetect) first
    assert remote[4:] == ["-m", "prefjax.main", "--distributed",
                          "--config=configs/dpo_synthetic.py", "--workdir=gs://bucket/runs/dpo",
                          "--config.train.num_steps=10"]


def test_flags_override_env_and_detach():
    r = launch("--dry-run", "--detach", "--config", "configs/mpo hh.py", "--tpu", "pod-b",
               **{**ENV, "PROJECT": ""})
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert "pod-b" in argv and not any(a.startswith("--project") for a in argv)
    remote = next(a for a in argv if a.startswith("--command="))
    assert "nohup" in remote and remote.rstrip().endswith("&")
    assert "--config=configs/mpo\\ hh.py" in remote  # quoted for the host's shell


@pytest.mark.parametrize("drop,name", [("TPU_NAME", "TPU_NAME"), ("CONFIG", "CONFIG"),
                                       ("WORKDIR", "WORKDIR"), ("ZONE", "ZONE")])
def test_missing_setting_fails(drop, name):
    r = launch("--dry-run", **{k: v for k, v in ENV.items() if k != drop})
    assert r.returncode == 2 and name in r.stderr and r.stdout == ""


def test_unknown_argument_fails():
    r = launch("--dry-run", "--config.train.lr=1", **ENV)
    assert r.returncode == 2 and "after --" in r.stderr
