"""Bradley-Terry reward model on the synthetic task's labelled pairs, from the SFT policy.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/rm_synthetic.py --workdir=workdirs/rm_synthetic

The export (`workdirs/rm_synthetic/export`: decoder + reward_head.safetensors) loads with
`prefjax.models.heads.RewardModel.from_hf` and scores rollouts of the online trainers.
Variants: `:center=0.01` (reward-centering term), `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, center=0.0, init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "reward_bt", center_coef=a.center)
    c.model.init_from = a.init_from
    c.reference.mode = "none"
    c.train.num_steps = 300
    c.train.lr = 1e-3
    c.train.best_metric = "eval/loss"
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
