"""One process of the multi-host CLI test: `prefjax.main`'s entry point, after joining the run.

    python -m tests.multihost.cli_worker [--num-processes N --process-id I --port P] \\
        -- --config=configs/X.py:smoke --workdir=DIR [--config.a=b ...]

`prefjax.main --distributed` lets `jax.distributed.initialize()` detect the cluster (TPU pods,
SLURM); on CPU there is nothing to detect, so this worker joins the processes over gloo itself
with the given coordinator port, then runs `prefjax.main.main` with the flags after `--`.
"""

from __future__ import annotations

import argparse
import sys

import jax


def main(argv: list[str]) -> None:
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv[:split])
    if a.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id)
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    from absl import app

    from prefjax import main as cli

    app.run(cli.main, argv=["prefjax.main", *argv[split + 1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
