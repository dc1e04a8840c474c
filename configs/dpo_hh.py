"""DPO on an Anthropic-HH-format local dataset with a local Hugging Face model.

    python -m prefjax.main --config=configs/dpo_hh.py --workdir=workdirs/dpo_hh \
        --config.model.source=/models/Qwen2-0.5B-Instruct \
        --config.data.source=/data/hh-rlhf/train.jsonl \
        --config.data.eval_source=/data/hh-rlhf/test.jsonl

HH rows hold only `chosen` / `rejected` transcripts sharing a prefix that ends at the last
"\\n\\nAssistant:"; prefjax splits them into prompt and responses. Reference log-probs are
precomputed once. On a pod: `--config.mesh.fsdp=-1 --config.model.dtype=bfloat16`.
`:smoke` shrinks lengths and steps (the model and data paths still need setting).
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1)
    c = base_config()
    set_algo(c, "dpo", beta=a.beta)
    c.model.source = "/path/to/hf_model"  # a local folder: config.json, safetensors, tokenizer
    c.model.logps_chunk = 8192  # never materialize float32 [b, t, vocab] logits
    c.model.remat = True
    # layers under one scan (unrolled layers defeat remat on CPU: 12 GB of temporaries for
    # a 0.5B step, 3 GB scanned) and O(t) attention; see benchmarks/README.md
    c.model.scan_layers = True
    c.model.attention = "blockwise"
    c.data.source = "/path/to/hh/train.jsonl"
    c.data.format = "hh"
    c.data.max_length = 512
    c.data.max_prompt_length = 384
    c.data.max_response_length = 128
    c.train.batch_size = 64
    c.train.num_steps = 2000
    c.train.lr = 5e-7
    c.train.warmup_steps = 150
    c.train.eval_every = 250
    c.train.save_every = 250
    if a.smoke:
        apply_smoke(c)
        c.data.max_length, c.data.max_prompt_length, c.data.max_response_length = 64, 40, 24
    return c
