"""What a run's steps cost and how close they come to the hardware: model FLOPs and MFU.

`fit` logs, per logging window, real (non-pad) tokens/s, the padding fraction (padding slots /
all slots the model computes on, packed or padded) and, with a `ModelFlops`, the model FLOPs per
step and MFU against a peak (`train.peak_flops`, the TPU chip table, or one measured matmul).

Model FLOPs count the useful work only (PaLM, appendix B, as `plan_shapes.model_flops`): every
real token through every matmul weight, and each sequence's attention over its own length, so a
padded and a packed batch of the same data have the same model FLOPs and MFU shows the waste.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import plan_shapes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of one train-step call as a function of its sequences' lengths.

    matmul_params: `plan_shapes.matmul_params` of the trained decoder. layers, attn_width: its
    `plan_shapes.attention_dims`. passes: forward-pass equivalents per call (3 for forward +
    backward; + 1 per forward of a live reference; online: 3 x epochs + scoring forwards).
    """

    matmul_params: int
    layers: int
    attn_width: int
    passes: float = 3.0

    def per_step(self, tokens: float, sum_sq: float) -> float:
        """FLOPs of a step whose sequences have sum(len) = tokens, sum(len^2) = sum_sq."""
        if tokens <= 0:
            return 0.0
        one = plan_shapes.model_flops(matmul_params=self.matmul_params, tokens=int(tokens),
                                      seq=sum_sq / tokens, layers=self.layers,
                                      attn_width=self.attn_width, backward=False)
        return self.passes * one


def model_flops_of(c, *, passes: float = 3.0) -> ModelFlops:
    """`ModelFlops` of config `c`'s policy (shapes only: nothing is allocated)."""
    from flax import nnx

    make, cfg, _ = plan_shapes.decoder_fn(c)
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    layers, width = plan_shapes.attention_dims(cfg)
    return ModelFlops(plan_shapes.matmul_params(nnx.state(abstract, nnx.Param)), layers, width,
                      passes)


def batch_stats(batch: Any) -> dict[str, Any] | None:
    """Device scalars of a (prepared, global) batch: real tokens, sum of squared sequence
    lengths, and the slots the model computes on (packed rows when packed). None when the batch
    has no attention_mask (the step's own business)."""
    if not isinstance(batch, Mapping) or "attention_mask" not in batch:
        return None
    ids = batch.get("packed_input_ids", batch.get("input_ids"))
    slots = int(np.prod(np.shape(ids))) if ids is not None else 0
    real, sq = _lengths(batch["attention_mask"])
    return {"real": real, "sum_sq": sq, "slots": slots}


@jax.jit
def _lengths(mask):
    n = jnp.sum(mask != 0, axis=-1).astype(jnp.float32)
    return jnp.sum(n), jnp.sum(n * n)


def _chip_peak(kind: str) -> float | None:
    """Peak bf16 FLOP/s of a TPU chip by device_kind (prefjax.plan's table), else None."""
    from prefjax.plan import CHIPS_BY_KIND

    tflops = CHIPS_BY_KIND.get(kind)
    return None if tflops is None else tflops * 1e12


def peak_flops(configured: float, dtype=jnp.float32) -> float:
    """Peak FLOP/s of all devices: `configured` when > 0; else the TPU chip table; else one
    timed [n, n] matmul per device in `dtype` (a measured, not a datasheet, peak). 0 when
    `configured` < 0 (no MFU)."""
    if configured > 0:
        return float(configured)
    if configured < 0:
        return 0.0
    devices = jax.devices()
    chip = _chip_peak(devices[0].device_kind)
    if chip is not None:
        return chip * len(devices)
    measured = _measured_matmul_flops(dtype)
    log.info("MFU peak: measured %.3g FLOP/s per device (%s matmul); set train.peak_flops to "
             "use a datasheet figure", measured, jnp.dtype(dtype).name)
    return measured * len(devices)


def _measured_matmul_flops(dtype, n: int = 1024, reps: int = 4) -> float:
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return 2 * n ** 3 * reps / max(time.perf_counter() - t0, 1e-9)


class EfficiencyWindow:
    """Running sums of `batch_stats` between two log records -> the `perf/*` efficiency keys.

    Timing keys are not part of a resumed run's reproducible metrics, so the window is not
    checkpointed: it restarts with the process.
    """

    def __init__(self, flops: ModelFlops | None = None, peak: float = 0.0):
        self.flops, self.peak = flops, peak
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.real = self.sum_sq = self.slots = self.model_flops = 0.0
        self.count = 0

    def add(self, stats: Mapping[str, Any] | None) -> None:
        if stats is None:
            return
        real, sq = (float(x) for x in jax.device_get((stats["real"], stats["sum_sq"])))
        self.real += real
        self.sum_sq += sq
        self.slots += stats["slots"]
        self.count += 1
        if self.flops is not None:
            self.model_flops += self.flops.per_step(real, sq)

    def perf(self) -> dict[str, float]:
        """perf/real_tokens_per_sec, perf/padding_fraction, perf/model_flops_per_step,
        perf/model_flops_per_sec and perf/mfu (those that apply), then a fresh window."""
        if not self.count:
            return {}
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"perf/real_tokens_per_sec": self.real / dt,
               "perf/padding_fraction": 1.0 - self.real / max(self.slots, 1.0)}
        if self.flops is not None:
            out["perf/model_flops_per_step"] = self.model_flops / self.count
            out["perf/model_flops_per_sec"] = self.model_flops / dt
            if self.peak > 0:
                out["perf/mfu"] = self.model_flops / dt / self.peak
        self.reset()
        return out
