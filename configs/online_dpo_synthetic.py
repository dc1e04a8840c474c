"""Online DPO on the synthetic task: two samples per prompt, labelled by the oracle r*.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/online_dpo_synthetic.py \\
        --workdir=workdirs/online_dpo_synthetic

Variants: `:beta=0.3`, `:rm=workdirs/rm_synthetic` (label with a trained reward model), `:smoke`.
The policy and reference log-probs are taken at the sampling temperature (`online.temperature`,
default 1); TRL's online DPO scores at 1 whatever it samples at (`online.logps_at_temperature
=False`). Every epoch sees the pairs in a fresh order.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1, rm="", init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "dpo", beta=a.beta)
    c.algo = "online_dpo"
    c.model.init_from = a.init_from
    c.online.reward = a.rm or "oracle"
    c.online.epochs = 1
    c.train.batch_size = 32
    c.train.num_steps = 60
    c.train.lr = 3e-4
    c.train.warmup_steps = 0
    c.train.eval_every = 10
    c.train.save_every = 10
    c.train.log_every = 1
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
