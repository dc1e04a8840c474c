"""Data -> batches: tokenized datasets, reference columns, the extra row group, train/eval loaders.

Every per-process batch enters the devices through `prefjax.parallel.global_batch`, which
returns global arrays in the loss's row order; the record says how rows group (`paired`, the
extra rows' flag key), nothing here names an algorithm.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import numpy as np
from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.data import BatchLoader, collate_pairs, collate_prompts, collate_sequences, unpaired
from prefjax.data.packing import pack_batch
from prefjax.losses.records import Algorithm

log = logging.getLogger(__name__)

_COLLATE = {"pairs": collate_pairs, "sequences": collate_sequences, "prompts": collate_prompts,
            "unpaired": unpaired.collate_unpaired}
# the dataset columns that hold precomputed reference log-probs, per data kind
REF_COLUMNS = {"pairs": ("ref_chosen_logps", "ref_rejected_logps"), "sequences": ("ref_logps",),
               "unpaired": unpaired.REF_COLUMNS}


def collate_fn(rec: Algorithm, c: ConfigDict, pad_id: int) -> Callable:
    """`rows -> batch` for the record's data kind (prompts: left-padded to max_prompt_length)."""
    seq_len = c.data.max_prompt_length if rec.data == "prompts" else c.data.max_length
    return functools.partial(_COLLATE[rec.data], pad_id=pad_id, seq_len=seq_len)


# data kinds whose rows packing keeps exact (offline, teacher-forced, no per-row head layout)
PACKABLE = ("pairs", "sequences", "unpaired")


def packing_applies(rec: Algorithm, c: ConfigDict, tail_key: str | None) -> bool:
    """Whether this run trains on packed batches: `data.packing` and an offline record whose
    rows pack exactly (one process, no extra row group: both reorder rows across batches)."""
    if not c.data.get("packing", False):
        return False
    why = ("online rollouts are built on device" if rec.online else
           f"data kind {rec.data!r}" if rec.data not in PACKABLE else
           f"the extra row group {tail_key!r}" if tail_key is not None else
           "several processes" if parallel.process_count() > 1 else
           "a value head" if rec.head == "value" else "")
    if why:
        log.info("data.packing: off for this run (%s)", why)
        return False
    return True


def packed_collate(collate: Callable, rec: Algorithm, c: ConfigDict) -> Callable:
    """`collate` (right-padded) followed by `prefjax.data.packing.pack_batch`, packed per
    micro-batch of `train.grad_accum` so that pairs stay in one micro-batch."""
    return functools.partial(_pack, collate, micro_batches=c.train.grad_accum,
                             paired=rec.paired, row_multiple=c.data.pack_row_multiple,
                             pad_id=collate.keywords["pad_id"])


def _pack(collate: Callable, rows, *, pad_id: int, **kw) -> dict:
    return pack_batch(collate(rows), pad_id=pad_id, **kw)


def sequence_collate(c: ConfigDict, pad_id: int) -> Callable:
    return functools.partial(collate_sequences, pad_id=pad_id, seq_len=c.data.max_length)


class MixedLoader:
    """Main rows plus an extra row group in one batch: `[main rows, extra m]`, the extra rows
    flagged by `mask_key` [m] (all 1: every extra row is real).

    Both loaders advance together; `state()` / `restore()` hold both positions, so such runs
    resume exactly like any other.
    """

    def __init__(self, main, extra: BatchLoader, mask_key: str):
        self.main, self.extra, self.mask_key = main, extra, mask_key
        # back-compat names of the two loaders
        self.pairs, self.samples = main, extra

    def state(self) -> dict:
        return {"pairs": self.main.state(), "samples": self.extra.state()}

    def restore(self, state: Mapping) -> None:
        self.main.restore(state["pairs"])
        self.extra.restore(state["samples"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        p, s = next(self.main), next(self.extra)
        out = {k: np.concatenate([p[k], s[k]]) for k in ("input_ids", "attention_mask",
                                                          "loss_mask")}
        if "ref_logps" in p:  # extra rows never read theirs; zeros keep the key [b]
            out["ref_logps"] = np.concatenate([p["ref_logps"], np.zeros(len(s["input_ids"]),
                                                                          np.float32)])
        out[self.mask_key] = np.ones(len(s["input_ids"]), np.float32)
        return out


def train_loader(ds, collate: Callable, c: ConfigDict, *, extra=None, rec: Algorithm | None = None
                 ):
    """This process's share of every global training batch (with the extra row group when the
    record's extra rows are used: `extra` is their tokenized dataset)."""
    pi, pc = parallel.process_index(), parallel.process_count()
    batches = BatchLoader(ds, batch_size=c.train.batch_size, collate=collate, seed=c.seed,
                          process_index=pi, process_count=pc)
    if extra is None:
        return batches
    section = c[rec.extra_rows.section]
    rows = BatchLoader(extra, batch_size=section.samples_per_batch, seed=c.seed + 1,
                       process_index=pi, process_count=pc,
                       collate=sequence_collate(c, collate.keywords["pad_id"]))
    return MixedLoader(batches, rows, rec.extra_rows.mask_key)


def eval_batches(eval_ds, collate: Callable, c: ConfigDict, train_batches) -> list[dict]:
    """This process's share of the held-out set as whole batches of `train.batch_size` (a
    remainder is reported); with an extra row group, each batch carries extra rows too."""
    bs = c.train.batch_size
    n = len(eval_ds) // bs * bs
    if n == 0:
        raise ValueError(f"the eval set has {len(eval_ds)} rows, fewer than one batch of {bs}")
    if n < len(eval_ds):
        log.warning("evaluating on %d of %d held-out rows (whole batches of %d)", n,
                    len(eval_ds), bs)
    pi, pc = parallel.process_index(), parallel.process_count()
    out = list(BatchLoader(eval_ds, batch_size=bs, collate=collate, seed=0, num_epochs=1,
                           process_index=pi, process_count=pc))
    if isinstance(train_batches, MixedLoader):
        extra = train_batches.extra
        probe = BatchLoader(extra.dataset, batch_size=extra.batch_size, collate=extra.collate,
                            seed=extra.seed + 1, process_index=pi, process_count=pc)
        mixed = MixedLoader(iter(out), probe, train_batches.mask_key)
        out = [next(mixed) for _ in range(len(out))]
    return out


def prompt_batches(ds, c: ConfigDict, pad_id: int, num: int, *, shuffle: bool = False
                   ) -> list[dict]:
    """This process's share of the first `num` (whole batches of `train.batch_size`) prompts of
    `ds`, left-padded, in dataset order (shuffle: in a `BatchLoader`'s seed-0 order, as the
    online trainers always evaluated); `parallel.global_batch` joins the shares."""
    bs = c.train.batch_size
    n = min(len(ds), num) // bs * bs
    if n == 0:
        raise ValueError(f"sampled evaluation needs at least one batch of {bs} held-out prompts "
                         f"(have {len(ds)}, eval.num_prompts={num})")
    collate = functools.partial(collate_prompts, pad_id=pad_id, seq_len=c.data.max_prompt_length)
    rows = ds.select(range(n))["prompt_ids"]
    order = np.random.default_rng([0, 0]).permutation(n) if shuffle else np.arange(n)
    pi, pc = parallel.process_index(), parallel.process_count()
    out = []
    for i in range(0, n, bs):
        mine = np.array_split(order[i:i + bs], pc)[pi]
        out.append(collate([{"prompt_ids": rows[int(j)]} for j in mine]))
    return out


def add_reference_columns(rec: Algorithm, datasets_: tuple, reference: Callable, collate: Callable,
                          c: ConfigDict, *, mesh, rules, workdir: str) -> tuple:
    """The datasets with precomputed reference log-prob columns (`REF_COLUMNS[rec.data]`): one
    mesh-sharded pass (`prefjax.train.refcache`), cached in `workdir/ref_logps` under a key of
    the reference's identity, the token ids and the truncation settings when `reference.cache`;
    `reference() -> module` is called only when some dataset misses the cache."""
    from prefjax.paths import as_path
    from prefjax.train import build
    from prefjax.train.refcache import reference_identity, reference_logps_columns

    d = c.data
    settings = {k: d[k] for k in ("max_length", "max_prompt_length", "max_response_length",
                                  "over_long")}
    kw = {}
    if c.reference.cache:
        source = (build.hf_folder(c.reference.source) if c.reference.source
                  else build.init_source(c))
        dtypes = {"dtype": c.model.dtype, "param_dtype": c.reference.get("param_dtype", "")}
        identity = (reference_identity(c.model.to_dict(), seed=c.seed, **dtypes)
                    if source == "tiny" else reference_identity(source, **dtypes))
        kw = dict(cache_dir=as_path(workdir) / "ref_logps", identity=identity, settings=settings)
    return tuple(reference_logps_columns(
        ds, reference, mesh=mesh, rules=rules, collate=collate, batch_size=c.train.batch_size,
        columns=REF_COLUMNS[rec.data], chunk=c.model.logps_chunk or None, **kw)
        for ds in datasets_)
