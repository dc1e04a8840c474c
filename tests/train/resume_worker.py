"""Subprocess body of the SIGKILL tests: `python -m tests.train.resume_worker DIR DELAY NAME`.

Runs configs/NAME.py:smoke (lengthened, see `resume_config`) through `prefjax.main.run`, the
CLI's code path. Each step is delayed by DELAY seconds so the parent can kill the run mid-way;
the delay wraps the jitted step from outside and changes no number.
"""

import logging
import sys
import time

import prefjax.pipeline.run as pipeline
from prefjax.config import lock
from prefjax.main import run
from tests.train.test_offline import resume_config


def main(workdir: str, delay: float, name: str) -> None:
    logging.basicConfig(level=logging.INFO, force=True)  # the parent checks the "resumed from" line
    fit = pipeline.fit

    def slow_fit(init_state, step, *args, **kw):
        def slow_step(state, batch):
            time.sleep(delay)
            return step(state, batch)

        return fit(init_state, slow_step, *args, **kw)

    pipeline.fit = slow_fit
    run(lock(resume_config(name)), workdir)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
