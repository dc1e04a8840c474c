"""Export of a run's final model as an HF folder, on every process (process 0 writes)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from flax import nnx

from prefjax import parallel
from prefjax.paths import is_remote, upload


def export(model: nnx.Module, path, tokenizer) -> Path:
    """The trained policy as an HF folder (a reward model exports its decoder + head).

    Call it on every process: `save_hf` gathers each tensor across hosts in turn and process 0
    writes; a `gs://` path is written locally and uploaded by process 0.
    """
    from prefjax.models.heads import RewardModel
    from prefjax.models.hf import save_hf
    from prefjax.pipeline.models import export_model

    if is_remote(path):  # save_hf writes local files; copy them up afterwards
        with tempfile.TemporaryDirectory() as tmp:
            export(model, Path(tmp), tokenizer)
            if parallel.is_main_process():
                upload(tmp, path)
        return path
    model = export_model(model)
    if isinstance(model, RewardModel):
        from prefjax.models.heads import save_reward_model

        return save_reward_model(model, path, tokenizer=tokenizer)
    return save_hf(model, path, tokenizer=tokenizer)
