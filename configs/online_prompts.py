"""Any online algorithm on a prompt-only local dataset with a local HF policy and reward model.

    python -m prefjax.main --config=configs/online_prompts.py:algo=p3o --workdir=workdirs/p3o \\
        --config.model.source=/models/sft --config.online.reward=/models/rm \\
        --config.data.source=/data/prompts.jsonl

`algo` is ppo | p3o | online_dpo. The reward model is a folder written by an rm run
(`export/` with reward_head.safetensors). `:smoke` shrinks everything.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, algo="p3o")
    c = base_config()
    set_algo(c, {"online_dpo": "dpo"}.get(a.algo, a.algo))
    c.algo = a.algo
    c.model.source = "/path/to/sft_model"
    c.model.logps_chunk = 8192
    c.online.reward = "/path/to/reward_model"
    c.online.max_new_tokens = 128
    c.data.source = "/path/to/prompts.jsonl"
    c.data.format = "prompt_only"
    c.data.max_length = 512
    c.data.max_prompt_length = 384
    c.data.max_response_length = 128
    c.train.batch_size = 64
    c.train.num_steps = 500
    c.train.lr = 1e-6
    c.train.eval_every = 50
    c.train.save_every = 50
    if a.smoke:
        apply_smoke(c)
        c.online.max_new_tokens = 8
        c.data.max_length, c.data.max_prompt_length, c.data.max_response_length = 48, 32, 16
    return c
