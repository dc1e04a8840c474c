"""`python -m prefjax.main --config=configs/X.py[:arg] --workdir=DIR [--config.field=value]`.

Re-running the same command in the same workdir resumes from its last checkpoint. Everything this
file does is `run(config, workdir)`, importable from notebooks and tests.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from prefjax import parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file (configs/*.py), optionally with :arg", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, export)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() first (multi-host: TPU pods, SLURM)")
flags.mark_flags_as_required(["config", "workdir"])


def run(config: ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir` (`config.algo`'s record decides data or rollouts); returns
    the last evaluation's metrics."""
    from prefjax.pipeline import train

    return train(config, workdir)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO lines
    import datasets

    datasets.disable_progress_bars()
    if _DISTRIBUTED.value:
        parallel.initialize_distributed()
    metrics = run(_CONFIG.value, _WORKDIR.value)
    if parallel.is_main_process():
        print({k: round(v, 4) for k, v in metrics.items()})


if __name__ == "__main__":
    app.run(main)
