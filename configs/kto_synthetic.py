"""KTO on unpaired synthetic data (prompt, completion, label) from the SFT policy.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/kto_synthetic.py --workdir=workdirs/kto_synthetic

The synthetic preference pairs become unpaired rows (chosen: desirable, rejected: undesirable);
each batch also scores every prompt with another row's completion to estimate the KL reference
point (prefjax.data.unpaired). Variants: `:beta=0.3`, `:desirable_weight=1.33`,
`:undesirable_weight=1.0`, `:labeling=argmax`, `:live` (live reference), `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
                  labeling="bt", live=False, init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "kto", beta=a.beta, desirable_weight=a.desirable_weight,
             undesirable_weight=a.undesirable_weight)
    c.model.init_from = a.init_from
    c.reference.mode = "live" if a.live else "precomputed"
    c.data.labeling = a.labeling
    c.data.num_train = 8192  # unpaired rows (two per synthetic pair)
    c.train.num_steps = 200
    c.train.lr = 1e-3
    c.eval.sample = True  # r* and KL of samples on held-out prompts
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
