"""One process of the multi-host test: tiny DPO on the synthetic task, then checkpoint round trips.

    python -m tests.multihost.worker --out DIR                                # 1 process
    python -m tests.multihost.worker --out DIR --num-processes 2 --process-id I --port P
        [--restore CKPT_DIR]

The caller sets JAX_PLATFORMS=cpu and XLA_FLAGS (simulated devices per process) before launch.
Each process loads its own slice of every global batch through `BatchLoader`, makes the global
array with `shard_batch`, trains STEPS steps on TRAIN_MESH and saves a checkpoint to
`DIR/ckpt`. With `--restore`, it also loads another run's checkpoint onto RESTORE_MESH.
Process i writes `DIR/result_<i>.npz` (losses, its local batches, the final and restored state
gathered to the host) and `DIR/meta_<i>.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import datasets
import jax
import numpy as np
import optax

from prefjax import losses
from prefjax.data import BatchLoader, add_reference_logps, collate_pairs, tokenize_dataset
from prefjax.data.synthetic import PAD_ID, VOCAB, make_preference_dataset, make_tokenizer
from prefjax.models.llama import Llama, LlamaConfig
from prefjax.parallel import (
    initialize_distributed,
    make_mesh,
    process_count,
    process_index,
    shard_batch,
)
from prefjax.train import (
    Checkpointer,
    abstract_train_state,
    build_train_step,
    create_train_state,
    state_shardings,
)

STEPS = 3
PAIRS = 8  # global pairs per step: 16 rows, 4 per data*fsdp shard
SEQ_LEN = 16  # one fixed length, so every host collates the same shapes
TRAIN_MESH = {"data": 2, "fsdp": 2, "tensor": 2}
RESTORE_MESH = {"data": 1, "fsdp": 8, "tensor": 1}  # the 2-process run restores across hosts
CONFIG = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, initializer_range=0.2)
OPT = optax.adamw(1e-2, weight_decay=0.1)
LOSS = losses.get("dpo", beta=0.1)
START = time.perf_counter()


def model_fn(rngs):
    return Llama(CONFIG, rngs=rngs)


def uniform_ref_logps(batch) -> np.ndarray:
    """log-probs of the responses under a uniform policy over the vocabulary: a reference that
    needs no model, so every process computes the same column in no time."""
    return -np.log(len(VOCAB)) * batch["loss_mask"].sum(-1)


def dataset():
    ds, _ = tokenize_dataset(make_preference_dataset(4 * PAIRS, seed=0), make_tokenizer(),
                             max_length=SEQ_LEN)
    collate = functools.partial(collate_pairs, pad_id=PAD_ID, seq_len=SEQ_LEN)
    return add_reference_logps(ds, uniform_ref_logps, batch_size=PAIRS, collate=collate), collate


def loader(index: int, count: int, state: dict | None = None) -> BatchLoader:
    ds, collate = dataset()
    return BatchLoader(ds, batch_size=PAIRS, collate=collate, seed=1, process_index=index,
                       process_count=count, state=state)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    """`{prefix/path: host numpy}` of a (possibly multi-host) state tree.

    One jitted identity replicates every leaf, so each process can read the whole value
    (a leaf sharded over two hosts is not addressable from either one alone).
    """
    mesh = jax.tree.leaves(tree)[0].sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = jax.jit(lambda t: t, out_shardings=replicated)(tree)
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in leaves}


def log(what: str) -> None:
    """Progress on stderr, which the test shows when a child fails or hangs."""
    print(f"[worker {process_index()}] {time.perf_counter() - START:6.1f}s {what}",
          file=sys.stderr, flush=True)


def train(out: Path) -> tuple[dict, dict]:
    mesh = make_mesh(TRAIN_MESH)
    state, sh = create_train_state(model_fn, OPT, mesh=mesh, seed=0)
    step = build_train_step(LOSS, OPT, mesh=mesh, state_shardings=sh)
    data = loader(process_index(), process_count())
    log("state and data ready")
    arrays: dict[str, list] = {"loss": [], "input_ids": [], "loss_mask": [], "ref_logps": []}
    for _ in range(STEPS):
        local = next(data)
        for key in ("input_ids", "loss_mask", "ref_logps"):
            arrays[key].append(local[key])
        state, m = step(state, shard_batch(local, mesh))
        arrays["loss"].append(float(m["loss"]))
        log(f"step {len(arrays['loss'])} loss {arrays['loss'][-1]:.6f}")
    meta = {"loader": data.state(), "step": int(state.step)}
    if process_count() > 1:
        arrays.update(interleaved_layout(local))
        meta["tensor_across_hosts_error"] = tensor_across_hosts_is_refused(local)
    with Checkpointer(out / "ckpt") as ck:
        ck.save(STEPS, state, extra={"loader": data.state()}, force=True)
    log("checkpoint saved")
    result = {k: np.asarray(v) for k, v in arrays.items()}
    result.update(flat({"params": state.params, "opt_state": state.opt_state}, "final/"))
    return result, meta


def interleaved_layout(local: dict) -> dict:
    """`shard_batch` on TRAIN_MESH with a device order that alternates hosts between row shards
    (process 0, 1, 0, 1 along data x fsdp): the global batch must still be in process order."""
    by_proc = [[d for d in jax.devices() if d.process_index == p] for p in range(process_count())]
    k = jax.local_device_count() // 2
    devices = [d for half in (slice(0, k), slice(k, None)) for ds in by_proc for d in ds[half]]
    mesh = make_mesh(TRAIN_MESH, devices=devices)
    rows = mesh.devices.reshape(-1, TRAIN_MESH["tensor"])[:, 0]
    assert [d.process_index for d in rows] == [0, 1, 0, 1], mesh.devices
    return flat(shard_batch(local, mesh), "interleaved/")


def tensor_across_hosts_is_refused(local: dict) -> str:
    """With only a tensor axis, both hosts would hold every row: `shard_batch` must say so."""
    try:
        shard_batch(local, make_mesh({"data": 1, "fsdp": 1, "tensor": 8}))
    except ValueError as e:
        return str(e)
    return ""


def restore(ckpt: Path) -> tuple[dict, dict]:
    """Load a checkpoint written by another run onto RESTORE_MESH; check where it landed."""
    abstract = abstract_train_state(model_fn, OPT, seed=0)
    mesh = make_mesh(RESTORE_MESH)
    target = state_shardings(abstract, mesh)
    with Checkpointer(ckpt) as ck:
        state, extra = ck.restore(abstract_state=abstract, shardings=target)
    log(f"restored {ckpt}")
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        if got.sharding != want:
            raise AssertionError(f"restored leaf has sharding {got.sharding}, wanted {want}")
    result = flat({"params": state.params, "opt_state": state.opt_state}, "restored/")
    return result, {"restored_extra": extra, "restored_step": int(state.step)}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--restore", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    if a.num_processes > 1:
        # CPU devices of different processes talk through gloo (the default has no cross-process
        # collectives); this must be set before the backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        initialize_distributed(f"127.0.0.1:{a.port}", a.num_processes, a.process_id)
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    datasets.disable_progress_bars()  # stderr is kept for failure reports, not progress bars
    log("started")
    result, meta = train(a.out)
    if a.restore is not None:
        more, more_meta = restore(a.restore)
        result.update(more)
        meta.update(more_meta)
    meta.update(process_index=process_index(), process_count=process_count(),
                devices=jax.device_count(), local_devices=jax.local_device_count())
    i = process_index()
    np.savez(a.out / f"result_{i}.npz", **result)
    (a.out / f"meta_{i}.json").write_text(json.dumps(meta, indent=1))
    log("done")


if __name__ == "__main__":
    main()
