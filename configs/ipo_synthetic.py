"""IPO (Azar et al. 2023) on the synthetic task, from the SFT policy.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/ipo_synthetic.py --workdir=workdirs/ipo_synthetic

`loss.beta` is IPO's tau (TRL's convention): the minimizer puts the log-ratio margin at
1 / (2 tau). Variants: `:tau=0.5`, `:labeling=argmax`, `:sum` (sums instead of TRL's
length-averaged log-probs), `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, tau=0.1, labeling="bt", sum=False,
                  init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "ipo", beta=a.tau, average=not a.sum)
    c.model.init_from = a.init_from
    c.data.labeling = a.labeling
    c.train.num_steps = 200
    c.train.lr = 1e-3
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
