"""P3O (pairwise PPO) on the synthetic task from the SFT policy, oracle reward r*.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/p3o_synthetic.py --workdir=workdirs/p3o_synthetic

Two samples per prompt, sequence-level KL-shaped rewards (`online.kl_coef`, the KL coefficient
of every online algorithm; `loss.kl_coef` is an alias of it), no value head. Log-probs of
policy, old policy and reference at the sampling temperature (`online.temperature`, default 1).
Variants: `:variant=v1|v2|official`, `:kl=0.1`, `:rm=workdirs/rm_synthetic`, `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, variant="v2", kl=0.05, rm="",
                  init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "p3o", variant=a.variant)
    c.online.kl_coef = a.kl  # loss.kl_coef follows it (set_algo links the two)
    c.model.init_from = a.init_from
    c.online.reward = a.rm or "oracle"
    c.train.batch_size = 32  # prompts per rollout (64 samples)
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
