"""SimPO (Meng et al. 2024): reference-free, length-normalized, with a target margin.

    python -m prefjax.main --config=configs/simpo_synthetic.py --workdir=workdirs/simpo_synthetic

Variants: `:beta=2.0,gamma=0.5`, `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=2.0, gamma=1.0, init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "simpo", beta=a.beta, gamma=a.gamma)
    c.model.init_from = a.init_from
    c.reference.mode = "none"
    c.train.num_steps = 200
    c.train.lr = 5e-4
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
