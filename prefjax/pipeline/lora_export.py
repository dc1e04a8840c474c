"""A LoRA run's adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

PEFT's LoRA layer adds `scaling * B @ A` to a torch weight [out, in] (lora_A.weight [r, in],
lora_B.weight [out, r], scaling = lora_alpha / r); prefjax adds `scale * a @ b` to a kernel
[in, out] (a [in, r], b [r, out]), so A = a.T and B = b.T, for nn.Linear and GPT-2's Conv1D
alike (PEFT's LoRA forward is x A^T B^T for both). Tensor names are the base module's HF name
(from the decoder's `hf_layout`) under `base_model.model.`, without the adapter name, as
`PeftModel.save_pretrained` writes them. GPT-2 fuses q|k|v into one `c_attn`: its adapter is
the q/k/v adapters side by side (A stacked [m r, in], B block-diagonal [3d, m r]), so it has
rank m r (`rank_pattern`) and the alpha that keeps the scale (`alpha_pattern`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from prefjax.models import hf
from prefjax.models.lora import adapters

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _module_suffix(name: str) -> str:
    """"model.layers.3.self_attn.q_proj.weight" -> "self_attn.q_proj" (PEFT target key)."""
    parts = name.removesuffix(".weight").split(".")
    i = max(j for j, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[i + 1:])


def peft_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
    """`(tensors, config fields)` of the adapters of a decoder with LoRA (float32 numpy).

    config fields: r, lora_alpha, target_modules, rank_pattern, alpha_pattern, fan_in_fan_out.
    """
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to export")
    cfg = model.config
    by_leaf: dict[tuple, list] = {}
    for p in hf.layout(hf.architecture(cfg.model_type, "save_peft"), cfg):
        by_leaf.setdefault(tuple(p.path), []).append(p)
    scales = {layer.scale for _, layer in found}
    if len(scales) != 1:
        raise ValueError(f"the adapters have different scales {sorted(scales)}; PEFT's "
                         "lora_alpha is one value")
    (scale,) = scales
    rank = found[0][1].lora_a.shape[-1]
    parts: dict[str, list] = {}  # HF module name -> [(cols, A [r, in], B [r_out, r])]
    for path, layer in found:
        for p in by_leaf[(*path, "kernel")]:
            a = hf.host_array(layer.lora_a.get_value(), p.layer)
            b = hf.host_array(layer.lora_b.get_value(), p.layer)
            parts.setdefault(p.name.removesuffix(".weight"), []).append((p.cols, a.T, b.T))
    tensors, fused = {}, {}
    for name, ps in parts.items():
        if ps[0][0] is None:  # one adapter on one HF module
            (_, a, b), = ps
        else:  # column blocks of a fused module (GPT-2 c_attn): block-diagonal B
            out = max(p.cols[1] for ps_ in by_leaf.values() for p in ps_
                      if p.name == f"{name}.weight")  # the fused width, e.g. 3d
            ps = sorted(ps, key=lambda x: x[0])
            a = np.concatenate([x[1] for x in ps], axis=0)
            b = np.zeros((out, a.shape[0]), np.float32)
            for i, (cols, _, bi) in enumerate(ps):
                b[cols[0]:cols[1], i * rank:(i + 1) * rank] = bi
            fused[_module_suffix(name)] = a.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    fields = dict(r=rank, lora_alpha=scale * rank,
                  target_modules=sorted({_module_suffix(n) for n in parts}),
                  rank_pattern=dict(fused), alpha_pattern={k: scale * r for k, r in fused.items()},
                  fan_in_fan_out=cfg.model_type == "gpt2")
    return tensors, fields


def save_peft(model: nnx.Module, path: str | os.PathLike, *, base_model: str = "") -> Path:
    """Write `model`'s adapters as a PEFT LoRA folder that `PeftModel.from_pretrained(base,
    path)` loads onto the HF base model; returns path. Call it on every process (arrays are
    gathered across hosts); process 0 writes. `base_model`: recorded as
    base_model_name_or_path."""
    tensors, fields = peft_tensors(model)
    path = Path(path)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        hf.write_safetensors(path / ADAPTER_WEIGHTS, tensors)
        config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model
                      or None, inference_mode=True, lora_dropout=0.0, bias="none",
                      use_rslora=False, init_lora_weights=True, modules_to_save=None, **fields)
        (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
