"""Side by side with HF TRL's DPOTrainer: the settings under which both compute the same steps.

    python -m prefjax.main --config=configs/trl_parity.py:algo=ipo,optimizer=sgd \
        --workdir=workdirs/trl_parity_ipo --config.model.source=/path/to/hf_model \
        --config.data.source=/path/to/pairs.jsonl --config.data.eval_source=/path/to/pairs.jsonl

tests/test_trl_parity.py runs it against `DPOConfig(loss_type=[algo's TRL name], beta,
learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0, max_grad_norm=1,
optim="adamw_torch" | "sgd")` on the same HF folder and jsonl. What makes the two runs the same:
float32 everywhere, one batch of every pair per step (`train.batch_size` = the number of pairs;
the row order inside a batch does not change a mean over pairs), a constant learning rate
without warmup, TRL's optimizers (AdamW b1 0.9, b2 0.999, eps 1e-8; plain SGD without
momentum) and clipping at global norm 1, and no truncation (rows shorter than the limits).
Reference log-probs are precomputed; TRL's live reference computes the same numbers.
Arguments: algo (dpo | ipo), optimizer (adamw | sgd), lr, steps, pairs, beta; `smoke` (2 steps;
the model and data paths still need setting).
"""

from prefjax.config import base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, algo="dpo", optimizer="adamw", lr=1e-3, steps=6, pairs=8,
                  beta=0.1)
    c = base_config()
    if a.algo not in ("dpo", "ipo"):
        raise ValueError(f"trl_parity: algo must be dpo or ipo, got {a.algo!r}")
    set_algo(c, a.algo, beta=a.beta)  # ipo: beta is tau, TRL's length-averaged form
    c.model.source = "/path/to/hf_model"  # a local HF folder (config, safetensors, tokenizer)
    c.model.dtype = "float32"
    c.data.source = "/path/to/pairs.jsonl"  # prompt / chosen / rejected strings
    c.data.eval_source = "/path/to/pairs.jsonl"
    c.data.max_length = 128
    c.data.max_prompt_length = 64
    c.data.max_response_length = 64
    c.data.over_long = "error"  # a truncated row would differ from TRL's: fail instead
    c.train.batch_size = a.pairs  # = the number of pairs in data.source: one batch per step
    c.train.num_steps = min(a.steps, 2) if a.smoke else a.steps
    c.train.lr = a.lr
    c.train.warmup_steps = 0
    c.train.schedule = "constant"
    c.train.optimizer = a.optimizer
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.log_every = 1
    c.train.eval_every = 0  # once, at the end
    c.train.save_every = 1000  # only the final checkpoint
    c.train.keep_checkpoints = 1
    c.train.export_hf = False
    return c
