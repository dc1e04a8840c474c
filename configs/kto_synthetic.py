"""KTO on unpaired synthetic data (prompt, completion, label) from the SFT policy.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/kto_synthetic.py --workdir=workdirs/kto_synthetic

The synthetic preference pairs become unpaired rows (chosen: desirable, rejected: undesirable);
each batch also scores every prompt with another row's completion to estimate the KL reference
point (prefjax.data.unpaired). Variants: `:beta=0.3`, `:desirable_weight=1.33`,
`:undesirable_weight=1.0`, `:labeling=argmax`, `:live` (live reference), `:smoke`.

Defaults: undesirable_weight 0.5 and lr 1e-4. With equal weights (TRL's default) pushing the
undesirable completions down dominates on this task: log-probs of both halves fall, the policy
drifts to sequences the data never shows, and r* of samples falls below the SFT policy's
(measured from a 150-step SFT policy, 128 eval prompts: r* 0.204 -> 0.02-0.16 after 60-150
steps at lr 1e-4 to 1e-3, sampled KL 2-11). At 0.5, lambda_D n_D / (lambda_U n_U) = 2 (the
KTO paper suggests 1 to 4/3 for its LLM runs), r* rose to 0.25-0.28 at KL 0.1-0.3 over 60-300
steps at lr 1e-4 to 2e-4, with either labeling (tests/train/test_online.py checks it).
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1, desirable_weight=1.0, undesirable_weight=0.5,
                  labeling="bt", live=False, init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "kto", beta=a.beta, desirable_weight=a.desirable_weight,
             undesirable_weight=a.undesirable_weight)
    c.model.init_from = a.init_from
    c.reference.mode = "live" if a.live else "precomputed"
    c.data.labeling = a.labeling
    c.data.num_train = 8192  # unpaired rows (two per synthetic pair)
    c.train.num_steps = 200
    c.train.lr = 1e-4
    c.eval.sample = True  # r* and KL of samples on held-out prompts
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
