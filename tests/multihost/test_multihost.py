"""Two jax processes (4 CPU devices each, gloo) train like one process with 8 devices.

The same worker (`tests/multihost/worker.py`) runs once as a single 8-device process and once as
two processes joined by `jax.distributed` on 127.0.0.1. The single process is the reference:
per-step losses and final parameters must agree, the two hosts' batches must together be the
single process's batch, and each run's checkpoint must restore in the other topology onto
another mesh. Children get hard timeouts: a hung collective fails the test with their stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from prefjax.parallel import make_mesh
from prefjax.train import Checkpointer, abstract_train_state, state_shardings
from tests.multihost import worker

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # a normal run takes ~15 s per phase on 2 busy cores
PARENT_MESH = {"data": 1, "fsdp": 4, "tensor": 2}  # neither the training nor the worker's restore
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    # the session's compilation cache stays (tests/conftest.py); every other JAX setting goes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))
           or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def run_processes(cmds: list[list[str]], logs: list[Path], timeout_s: float) -> None:
    """Run one process per command (`8 // len(cmds)` CPU devices each) to completion; on any
    failure or timeout kill the rest and fail with every child's stderr (a survivor would wait
    forever in a collective)."""
    n = len(cmds)
    procs, files = [], []
    for cmd, log in zip(cmds, logs):
        files.append(log.open("w"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=child_env(8 // n), stdout=files[-1],
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(f"--- process {i} (rc={c}) ---\n" + log.read_text()[-4000:]
                          for i, (c, log) in enumerate(zip(codes, logs)))
        timed_out = time.monotonic() > deadline
        pytest.fail(f"{n}-process run {'timed out' if timed_out else 'failed'}:\n{tails}")


def process_flags(n: int, i: int, port: int) -> list[str]:
    """The worker flags of process `i` of `n` (none for a single process)."""
    return ["--num-processes", str(n), "--process-id", str(i), "--port", str(port)] if n > 1 else []


def launch(out: Path, n: int, extra: list[str] = ()) -> None:
    """`n` processes of tests/multihost/worker.py writing their results to `out`."""
    out.mkdir(parents=True)
    port = free_port()
    cmds = [[sys.executable, "-m", "tests.multihost.worker", "--out", str(out), *extra,
             *process_flags(n, i, port)] for i in range(n)]
    run_processes(cmds, [out / f"stderr_{i}.txt" for i in range(n)], TIMEOUT_S)


def load(out: Path, i: int) -> tuple[dict, dict]:
    with np.load(out / f"result_{i}.npz") as f:
        arrays = dict(f)
    return arrays, json.loads((out / f"meta_{i}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 8-device process, then two 4-device processes that also restore its checkpoint."""
    root = tmp_path_factory.mktemp("multihost")
    launch(root / "one", 1)
    launch(root / "two", 2, ["--restore", str(root / "one" / "ckpt")])
    return {"one": [load(root / "one", 0)], "two": [load(root / "two", i) for i in range(2)],
            "root": root}


def state_keys(arrays: dict, prefix: str) -> list[str]:
    return sorted(k for k in arrays if k.startswith(prefix))


def test_topology_is_what_the_run_claims(runs):
    (_, m1), = runs["one"]
    assert (m1["process_count"], m1["devices"], m1["local_devices"]) == (1, 8, 8)
    for i, (_, m) in enumerate(runs["two"]):
        assert (m["process_index"], m["process_count"]) == (i, 2)
        assert (m["devices"], m["local_devices"]) == (8, 4)
        assert m["step"] == worker.STEPS and m["loader"] == m1["loader"]


def test_hosts_load_disjoint_halves_of_the_single_process_batch(runs):
    (one, _), = runs["one"]
    (h0, _), (h1, _) = runs["two"]
    n = worker.PAIRS // 2  # pairs per host
    for key in ("input_ids", "loss_mask", "ref_logps"):
        for s in range(worker.STEPS):
            a, b = h0[key][s], h1[key][s]
            assert a.shape[0] == b.shape[0] == 2 * n
            # each host collates [its chosen, its rejected]; the global batch is all chosen rows
            # (host order), then all rejected rows: exactly the single process's batch
            np.testing.assert_array_equal(
                np.concatenate([a[:n], b[:n], a[n:], b[n:]]), one[key][s], err_msg=key)
    pairs = [{(r[s, j].tobytes(), r[s, n + j].tobytes()) for s in range(worker.STEPS)
              for j in range(n)} for r in (h0["input_ids"], h1["input_ids"])]
    assert len(pairs[0]) == len(pairs[1]) == worker.STEPS * n
    assert not pairs[0] & pairs[1]  # no pair is trained on by both hosts


def test_global_batch_is_in_process_order_whatever_the_device_order(runs):
    """A mesh whose row shards alternate between hosts still yields [host 0 rows, host 1 rows]
    (else each host's [chosen, rejected] block would be torn apart and pairs mixed)."""
    (h0, _), (h1, _) = runs["two"]
    for two, _ in runs["two"]:
        for key in ("input_ids", "loss_mask", "ref_logps"):
            np.testing.assert_array_equal(two[f"interleaved/['{key}']"],
                                          np.concatenate([h0[key][-1], h1[key][-1]]))


def test_batch_axes_must_split_rows_between_hosts(runs):
    for _, m in runs["two"]:
        assert "must split the rows between processes" in m["tensor_across_hosts_error"]


def test_two_processes_train_like_one(runs):
    (one, _), = runs["one"]
    for two, _ in runs["two"]:  # each host gathered the whole final state
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
        keys = state_keys(one, "final/")
        assert keys == state_keys(two, "final/") and len(keys) > 20
        for k in keys:
            a, b = two[k], one[k]
            # gloo and in-process all-reduces may sum float32 in another order: tolerance per
            # leaf as in tests/train/test_step.py. AdamW divides by each coordinate's gradient
            # RMS, so a coordinate whose gradient is ~0 is the most sensitive; this setup stays
            # more than 10x inside the tolerance.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-7, 1e-5 * np.abs(b).max()),
                                       err_msg=k)
    assert not np.allclose(one["loss"][0], one["loss"][-1])  # the steps really trained


def test_one_process_checkpoint_restores_in_two_processes(runs):
    (one, m1), = runs["one"]
    for two, m in runs["two"]:
        assert m["restored_step"] == worker.STEPS
        assert m["restored_extra"] == {"loader": m1["loader"]}
        for k in state_keys(one, "final/"):
            np.testing.assert_array_equal(two["restored/" + k[len("final/"):]], one[k],
                                          err_msg=k)


def test_two_process_checkpoint_restores_in_one_process(runs):
    """This pytest process (8 devices, another mesh) reads what the two hosts wrote together."""
    (two, m2), _ = runs["two"]
    abstract = abstract_train_state(worker.model_fn, worker.OPT, seed=0)
    mesh = make_mesh(PARENT_MESH, devices=jax.devices()[:8])
    target = state_shardings(abstract, mesh)
    with Checkpointer(runs["root"] / "two" / "ckpt") as ck:
        state, extra = ck.restore(abstract_state=abstract, shardings=target)
    assert extra == {"loader": m2["loader"]} and int(state.step) == worker.STEPS
    emb = state.params["embed"]["embedding"].get_value()
    assert emb.sharding == target.params["embed"]["embedding"].get_value()
    assert emb.addressable_shards[0].data.shape == (worker.CONFIG.vocab_size // 2,
                                                    worker.CONFIG.hidden_size // 4)
    got = worker.flat({"params": state.params, "opt_state": state.opt_state}, "final/")
    assert sorted(got) == state_keys(two, "final/")
    for k, v in got.items():
        np.testing.assert_array_equal(v, two[k], err_msg=k)
