"""Why tests/multihost/test_cli_multihost.py compares 2 x 4 devices with a gloo single process.

One float32 all-reduce over 8 CPU devices, three ways: XLA's in-process all-reduce (1 process),
gloo with 1 process, gloo with 2 processes x 4 devices. Gloo's result does not depend on how the
8 devices are spread over processes (bitwise equal), while the in-process all-reduce adds the
same numbers in another order: its sums differ in the last bits (both are float32 roundings of
the float64 sum). So a trained model's weights after 2 x 4 gloo training differ from an
in-process 1 x 8 run by summation-order noise only, and equal a 1 x 8 gloo run bitwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.multihost.sum_worker import rows
from tests.multihost.test_multihost import free_port, process_flags, run_processes

pytestmark = pytest.mark.slow


def all_reduce(out: Path, n: int, *, gloo: bool) -> list[np.ndarray]:
    """The all-reduced sum as each of `n` processes sees it."""
    port = free_port()
    cmds = [[sys.executable, "-m", "tests.multihost.sum_worker", "--out", str(out / f"{i}.npy"),
             *(["--gloo", "--num-processes", str(n), "--process-id", str(i), "--port",
                str(port)] if gloo else process_flags(n, i, port))] for i in range(n)]
    out.mkdir()
    run_processes(cmds, [out / f"log_{i}.txt" for i in range(n)], timeout_s=120)
    return [np.load(out / f"{i}.npy") for i in range(n)]


def test_gloo_sums_alike_on_one_or_two_hosts_and_unlike_in_process(tmp_path):
    (in_process,) = all_reduce(tmp_path / "in_process", 1, gloo=False)
    (gloo_one,) = all_reduce(tmp_path / "gloo_one", 1, gloo=True)
    gloo_two = all_reduce(tmp_path / "gloo_two", 2, gloo=True)
    x = rows().astype(np.float64)
    exact = x.sum(0)
    bound = 7 * np.finfo(np.float32).eps * np.abs(x).sum(0)  # 7 float32 additions, any order
    for got in (in_process, gloo_one, *gloo_two):
        assert got.dtype == np.float32 and np.all(np.abs(got - exact) <= bound)
    for got in gloo_two:
        np.testing.assert_array_equal(got, gloo_one)
    differ = np.mean(in_process != gloo_one)
    assert differ > 0.1, f"only {differ:.1%} of the sums differ"
