"""MPO on an Anthropic-HH-format local dataset with a local Hugging Face model.

    python -m prefjax.main --config=configs/mpo_hh.py --workdir=workdirs/mpo_hh \
        --config.model.source=/models/Qwen2-0.5B-Instruct \
        --config.data.source=/data/hh-rlhf/train.jsonl

Stage 1 samples reference responses on the training prompts once (stored in the workdir), or
reads them from a completion-format file (`--config.mpo.ref_samples=/data/refs.jsonl`); then
training needs neither a reward model nor a reference model. `:smoke` shrinks everything.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1, alpha=0.1)
    c = base_config()
    set_algo(c, "mpo", beta=a.beta, alpha=a.alpha)
    c.model.source = "/path/to/hf_model"
    c.model.logps_chunk = 8192
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
    c.mpo.ref_samples = "generate"
    c.mpo.num_ref_samples = 8192
    c.mpo.samples_per_batch = 32
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
