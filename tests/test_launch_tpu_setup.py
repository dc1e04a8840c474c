"""experiments/launch_tpu.sh --setup installs prefjax with the `tpu` and `gcs` extras on every
host, and setup.cfg defines those extras (jax[tpu] in prefjax's jax range, gcsfs)."""

import configparser
import shlex

from tests.test_launch_tpu import ENV, SCRIPT, launch


def test_setup_installs_the_tpu_and_gcs_extras_on_every_host():
    r = launch("--setup", "--dry-run", TPU_NAME="pod-a", ZONE="us-central2-b")
    assert r.returncode == 0, r.stderr  # CONFIG / WORKDIR are not needed to install
    argv = shlex.split(r.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert "--worker=all" in argv
    remote = next(a for a in argv if a.startswith("--command=")).split("=", 1)[1]
    assert remote.startswith("cd ~/prefjax && ")
    assert "python3 -m venv .venv" in remote
    assert remote.endswith(".venv/bin/python -m pip install -q -e '.[tpu,gcs]'")
    assert "prefjax.main" not in remote
    ok = launch("--dry-run", **ENV)  # without --setup: the training command, unchanged
    assert ok.returncode == 0 and "pip install" not in ok.stdout


def test_setup_cfg_defines_the_extras_the_launcher_installs():
    cfg = configparser.ConfigParser()
    cfg.read(SCRIPT.parents[1] / "setup.cfg")
    extras = cfg["options.extras_require"]
    jax_range = next(r for r in cfg["options"]["install_requires"].split() if r.startswith("jax"))
    assert extras["tpu"].split() == [jax_range.replace("jax", "jax[tpu]", 1)]
    assert extras["gcs"].split()[0].startswith("gcsfs")
    readme = (SCRIPT.parent / "README.md").read_text()
    assert "launch_tpu.sh --setup" in readme and "'.[tpu,gcs]'" in readme
