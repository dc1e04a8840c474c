"""DPO on the synthetic task, starting from the SFT policy (also the frozen reference).

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/dpo_synthetic.py --workdir=workdirs/dpo_synthetic

Variants: `:beta=0.3`, `:labeling=argmax` (deterministic preferences), `:live` (live reference
model instead of precomputed log-probs), `:smoke` (seconds-long CPU run from a random init).
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1, labeling="bt", live=False,
                  init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "dpo", beta=a.beta)
    c.model.init_from = a.init_from
    c.reference.mode = "live" if a.live else "precomputed"
    c.data.labeling = a.labeling
    c.train.num_steps = 200
    c.train.lr = 1e-3
    c.train.best_metric = "eval/loss"
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
