"""One process of tests/multihost/test_collectives.py: sum 8 device rows with one all-reduce.

    python -m tests.multihost.sum_worker --out FILE [--gloo --num-processes N --process-id I
        --port P]

Row d of a fixed float32 matrix [8, 1024] (magnitudes 1e-4 .. 1e4, so the summation order shows
in the last bits) lives on device d of an 8-device mesh; a jitted sum over rows (one all-reduce)
is written to FILE (.npy). Without --gloo, XLA's in-process CPU all-reduce runs.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np


def rows() -> np.ndarray:
    """The summed matrix [8, 1024], float32."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((8, 1024)) * np.logspace(-4, 4, 8)[:, None]).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--gloo", action="store_true")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    if a.gloo:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id)
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices())
    g = rows()
    x = jax.make_array_from_callback(g.shape, NamedSharding(mesh, PartitionSpec("x")),
                                     lambda i: g[i])
    total = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    np.save(a.out, np.asarray(total.addressable_data(0)))


if __name__ == "__main__":
    main()
