"""MPO (Jiang, Huang, Wei 2023) on the synthetic task: no reward model, no reference model.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/mpo_synthetic.py --workdir=workdirs/mpo_synthetic

Stage 1 samples `mpo.num_ref_samples` responses from the reference (the SFT policy) once and
stores them in the workdir; reference log-probs of the pairs are precomputed once too, so
training holds only the policy. Loss = preference term + beta * pairwise preference KL +
alpha * NLL of the reference samples (ALGORITHMS.md section 3).
Variants: `:beta=0.1,alpha=0.5`, `:labeling=argmax`, `:refs=synthetic` (the task's reference
generator instead of sampling), `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, beta=0.1, alpha=0.1, labeling="bt", refs="generate",
                  init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "mpo", beta=a.beta, alpha=a.alpha)
    c.model.init_from = a.init_from
    c.data.labeling = a.labeling
    c.mpo.ref_samples = a.refs
    c.train.num_steps = 200
    c.train.lr = 1e-3
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
