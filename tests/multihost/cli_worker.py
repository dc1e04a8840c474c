"""One process of the multi-host CLI test: `prefjax.main`'s entry point, after joining the run.

    python -m tests.multihost.cli_worker [--num-processes N --process-id I --port P] \\
        [--gloo] [--kill-after-save STEP] \\
        -- --config=configs/X.py:smoke --workdir=DIR [--config.a=b ...]

`prefjax.main --distributed` lets `jax.distributed.initialize()` detect the cluster (TPU pods,
SLURM); on CPU there is nothing to detect, so this worker joins the processes over gloo itself
with the given coordinator port, then runs `prefjax.main.main` with the flags after `--`.

--gloo: a single process joins a one-process "cluster" too, so its 8 devices all-reduce through
    gloo like 2 x 4 devices do (XLA's in-process all-reduce sums in another order; see
    tests/multihost/test_collectives.py).
--kill-after-save STEP: once this process's part of checkpoint STEP is on disk, it SIGKILLs
    itself (a host lost mid-run; the test then kills the others and resumes all).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import jax


def kill_after_save(step: int) -> None:
    """Make `Checkpointer.save` of `step` end this process right after the save completes."""
    from prefjax.train import checkpoint

    save = checkpoint.Checkpointer.save

    def save_then_die(self, s, *args, **kwargs):
        started = save(self, s, *args, **kwargs)
        if int(s) == step:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpoint.Checkpointer.save = save_then_die


def main(argv: list[str]) -> None:
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--gloo", action="store_true")
    p.add_argument("--kill-after-save", type=int, default=None)
    a = p.parse_args(argv[:split])
    if a.num_processes > 1 or a.gloo:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id)
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if a.kill_after_save is not None:
        kill_after_save(a.kill_after_save)
    from absl import app

    from prefjax import main as cli

    app.run(cli.main, argv=["prefjax.main", *argv[split + 1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
