"""DPO with LoRA on an Anthropic-HH-format local dataset with a local Hugging Face model: one
model in memory (the frozen base, adapters off, is the live reference), optimizer state and
checkpoints for the adapters only.

    python -m prefjax.main --config=configs/dpo_lora_hh.py --workdir=workdirs/dpo_lora_hh \
        --config.model.source=/models/Qwen2-0.5B-Instruct \
        --config.data.source=/data/hh-rlhf/train.jsonl \
        --config.data.eval_source=/data/hh-rlhf/test.jsonl

Writes the merged model to workdir/export (an HF folder) and the adapters to
workdir/export_adapter (a PEFT folder over `model.source`). Data handling as configs/dpo_hh.py.
Not yet run at full length: no result is recorded here (the `:smoke` variant is a test).

Variants: `:rank=16`, `:alpha=32`, `:targets=q,v`, `:beta=0.3`, `:smoke` (lengths and steps
shrunk; the model and data paths still need setting).
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, rank=16, alpha=32.0, targets="all", beta=0.1)
    c = base_config()
    set_algo(c, "dpo", beta=a.beta)
    c.model.source = "/path/to/hf_model"  # a local folder: config.json, safetensors, tokenizer
    c.model.logps_chunk = 8192  # never materialize float32 [b, t, vocab] logits
    c.model.remat = True
    c.model.scan_layers = True
    c.model.attention = "blockwise"
    c.lora.rank = a.rank
    c.lora.alpha = a.alpha
    c.lora.targets = a.targets
    c.reference.mode = "live"  # the base with adapters off: no second model, no precompute pass
    c.data.source = "/path/to/hh/train.jsonl"
    c.data.format = "hh"
    c.data.max_length = 512
    c.data.max_prompt_length = 384
    c.data.max_response_length = 128
    c.train.batch_size = 64
    c.train.num_steps = 2000
    c.train.lr = 5e-5  # adapters start at zero delta and take larger steps (not tuned here)
    c.train.warmup_steps = 150
    c.train.eval_every = 250
    c.train.save_every = 250
    if a.smoke:
        apply_smoke(c)
        c.data.max_length, c.data.max_prompt_length, c.data.max_response_length = 64, 40, 24
    return c
