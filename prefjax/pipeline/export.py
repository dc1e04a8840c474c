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
    from prefjax.models.lora import merge_adapters
    from prefjax.pipeline.models import export_model

    if is_remote(path):  # save_hf writes local files; copy them up afterwards
        with tempfile.TemporaryDirectory() as tmp:
            export(model, Path(tmp), tokenizer)
            if parallel.is_main_process():
                upload(tmp, path)
        return path
    model = merge_adapters(export_model(model))  # LoRA: W + scale A B, a plain model
    if isinstance(model, RewardModel):
        from prefjax.models.heads import save_reward_model

        return save_reward_model(model, path, tokenizer=tokenizer)
    return save_hf(model, path, tokenizer=tokenizer)


def adapter_dir(workdir) -> Path:
    """Where a LoRA run writes its adapters as a PEFT folder (beside the merged `export/`)."""
    from prefjax.paths import as_path

    return as_path(workdir) / "export_adapter"


def export_adapter(model: nnx.Module, path, *, base_model: str = "") -> Path:
    """The trained policy's LoRA adapters as a PEFT adapter folder (`save_peft`) that
    `PeftModel.from_pretrained` loads onto the base `base_model`. Call it on every process."""
    from prefjax.pipeline.lora_export import save_peft
    from prefjax.pipeline.models import export_model

    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            export_adapter(model, Path(tmp), base_model=base_model)
            if parallel.is_main_process():
                upload(tmp, path)
        return path
    from prefjax.models.heads import RewardModel

    model = export_model(model)
    if isinstance(model, RewardModel):  # PEFT would need its score head as modules_to_save
        raise ValueError("a reward model's LoRA adapters have no PEFT export here; set "
                         "lora.export_adapter=False (the merged export/ holds the model)")
    return save_peft(model, path, base_model=base_model)
