"""SFT of a tiny Llama on the synthetic task's reference-policy data (the start of every run).

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic

The exported policy (`workdirs/sft_synthetic/export`) is the reference / initial policy of the
preference configs. `:smoke` makes it a seconds-long CPU run.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False)
    c = base_config()
    set_algo(c, "sft", reduction="token_mean")
    c.data.num_train = 8192
    c.train.batch_size = 64
    c.train.num_steps = 400
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.schedule = "cosine"
    c.train.eval_every = 100
    c.train.save_every = 100
    return apply_smoke(c) if a.smoke else c
