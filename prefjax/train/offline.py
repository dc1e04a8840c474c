"""Offline training entry point (kept for existing callers): `train(config, workdir)`.

Every algorithm, offline or online, now runs through the one pipeline, `prefjax.pipeline`
(records in `prefjax.losses.records`); this module re-exports its pieces under their old names.
Name lists of algorithms (`SEQUENCE_ALGOS`, `REF_KEY`) and `needs_reference` are deprecated:
read the algorithm's record instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from prefjax.pipeline.batches import MixedLoader
from prefjax.pipeline.export import export
from prefjax.pipeline.extra_rows import generate_samples
from prefjax.pipeline.run import train
from prefjax.pipeline.workdir import write_config

__all__ = ["MixedLoader", "export", "generate_samples", "needs_reference", "train",
           "write_config"]


def needs_reference(algo: str, hp: Mapping[str, Any]) -> bool:
    """Deprecated: `prefjax.losses.records.get(algo).needs_reference(hp)`."""
    from prefjax.losses import records

    warnings.warn("prefjax.train.offline.needs_reference is deprecated; use "
                  "prefjax.losses.records.get(algo).needs_reference(hparams)",
                  DeprecationWarning, stacklevel=2)
    return records.get(algo).needs_reference(hp)


def __getattr__(name: str):
    from prefjax.losses import records

    if name == "SEQUENCE_ALGOS":
        value = tuple(n for n, r in records.RECORDS.items() if r.data == "sequences")
    elif name == "REF_KEY":
        value = next(r.extra_rows.mask_key for r in records.RECORDS.values() if r.extra_rows)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"prefjax.train.offline.{name} is deprecated; read the algorithm records "
                  "(prefjax.losses.records)", DeprecationWarning, stacklevel=2)
    return value
