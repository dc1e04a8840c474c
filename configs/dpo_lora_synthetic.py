"""DPO with LoRA on the synthetic task: adapters on every projection of the SFT policy, whose
frozen base (adapters off) is also the reference, so one model is in memory.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/dpo_lora_synthetic.py --workdir=workdirs/dpo_lora

Writes the merged model to workdirs/dpo_lora/export (an HF folder) and the adapters to
workdirs/dpo_lora/export_adapter (a PEFT folder: `PeftModel.from_pretrained(base, folder)` with
the SFT export as base); checkpoints hold only the adapters and their optimizer state.
Not yet run at full length: no result is recorded here (the `:smoke` variant is a test).

Variants: `:rank=16`, `:alpha=32`, `:targets=q,v` (projections with adapters), `:beta=0.3`,
`:precomputed` (reference log-probs computed once before training instead of by the base in
each step), `:smoke` (seconds-long CPU run from a random init).
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, rank=8, alpha=16.0, targets="all", beta=0.1,
                  precomputed=False, init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "dpo", beta=a.beta)
    c.model.init_from = a.init_from
    c.lora.rank = a.rank
    c.lora.alpha = a.alpha
    c.lora.targets = a.targets
    # live: the base (adapters off) scores each batch, no second model
    c.reference.mode = "precomputed" if a.precomputed else "live"
    c.train.num_steps = 200
    c.train.lr = 5e-3  # adapters start at zero delta and take larger steps than full fine-tuning
    c.train.best_metric = "eval/loss"
    if a.smoke:
        c.model.init_from = ""
        apply_smoke(c)
    return c
