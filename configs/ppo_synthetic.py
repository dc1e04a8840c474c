"""RLHF-PPO on the synthetic task from the SFT policy, rewarded by the ground-truth oracle r*.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/ppo_synthetic.py --workdir=workdirs/ppo_synthetic

Each step samples one response per prompt, shapes per-token rewards with a KL penalty
(`online.kl_coef`) against the SFT policy, fits a value head by GAE and runs `online.epochs`
clipped PPO passes. Variants: `:kl=0.1`, `:rm=workdirs/rm_synthetic` (a trained reward model
instead of the oracle), `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, kl=0.05, rm="", init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "ppo")
    c.model.init_from = a.init_from
    c.online.kl_coef = a.kl
    c.online.reward = a.rm or "oracle"
    c.train.batch_size = 64  # prompts per rollout
    c.train.num_steps = 60
    c.train.lr = 1e-4
    c.train.warmup_steps = 0
    c.train.eval_every = 10
    c.train.save_every = 10
    c.train.log_every = 1
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
