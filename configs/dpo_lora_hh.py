"""DPO with LoRA on an Anthropic-HH-format local dataset with a local Hugging Face model: one
model in memory (the frozen base, adapters off, is the live reference), optimizer state and
checkpoints for the adapters only.

    python -m prefjax.main --config=configs/dpo_lora_hh.py --workdir=workdirs/dpo_lora_hh \
        --config.model.source=/models/Qwen2-0.5B-Instruct \
        --config.data.source=/data/hh-rlhf/train.jsonl \
        --config.data.eval_source=/data/hh-rlhf/test.jsonl

configs/dpo_hh.py (data, lengths, schedule, memory settings) plus the LoRA fields below.
Writes the merged model to workdir/export (an HF folder) and the adapters to
workdir/export_adapter (a PEFT folder over `model.source`).
Not yet run at full length: no result is recorded here (the `:smoke` variant is a test).

Variants: `:rank=16`, `:alpha=32`, `:targets=q,v`, `:beta=0.3`, `:smoke` (lengths and steps
shrunk; the model and data paths still need setting).
"""

import importlib.util
from pathlib import Path

from prefjax.config import parse_arg


def _dpo_hh():
    """configs/dpo_hh.py, loaded from beside this file (configs are files, not a package)."""
    spec = importlib.util.spec_from_file_location("dpo_hh", Path(__file__).with_name("dpo_hh.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, rank=16, alpha=32.0, targets="all", beta=0.1)
    c = _dpo_hh().get_config(f"beta={a.beta}" + (",smoke" if a.smoke else ""))
    c.lora.rank = a.rank
    c.lora.alpha = a.alpha
    c.lora.targets = a.targets
    c.reference.mode = "live"  # the base with adapters off: no second model, no precompute pass
    c.train.lr = 5e-5  # adapters start at zero delta and take larger steps (not tuned here)
    return c
