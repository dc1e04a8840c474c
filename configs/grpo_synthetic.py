"""GRPO (and Dr. GRPO / DAPO / GSPO) on the synthetic task from the SFT policy, oracle reward r*.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/grpo_synthetic.py --workdir=workdirs/grpo_synthetic

k = `online.num_generations` samples per prompt, group-normalised advantages, clipped surrogate.
Variants: `:variant=grpo|dr_grpo|dapo|gspo` (presets below), `:k=8`, `:beta=0.04` (k3 KL to
the reference), `:tis=2.0` (truncated importance sampling against the sampler, cap C),
`:reward=verifiable` (the exact-match task of prefjax.data.verifiable), `:smoke`.

    grpo:    scale_rewards group, loss_type grpo (per-sequence token mean)
    dr_grpo: scale_rewards none, loss_type dr_grpo (constant normaliser k * max_new_tokens)
    dapo:    scale_rewards group, loss_type dapo (token mean), epsilon_high 0.28, dynamic sampling
    gspo:    scale_rewards group, loss_type grpo, sequence-level importance ratio, eps 3e-4/4e-4
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo

PRESETS = {
    "grpo": dict(scale="group", loss=dict(loss_type="grpo")),
    "dr_grpo": dict(scale="none", loss=dict(loss_type="dr_grpo")),
    "dapo": dict(scale="group", dynamic=True, loss=dict(loss_type="dapo", epsilon_high=0.28)),
    "gspo": dict(scale="group", loss=dict(loss_type="grpo", importance_sampling_level="sequence",
                                          epsilon=3e-4, epsilon_high=4e-4)),
}
REWARDS = {"oracle": "oracle", "verifiable": "prefjax.data.verifiable:exact_match"}


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, variant="grpo", k=4, beta=0.0, tis=0.0, reward="oracle",
                  init_from="workdirs/sft_synthetic")
    if a.variant not in PRESETS:
        raise ValueError(f"variant={a.variant!r}: expected one of {sorted(PRESETS)}")
    if a.reward not in REWARDS:
        raise ValueError(f"reward={a.reward!r}: expected one of {sorted(REWARDS)}")
    p = PRESETS[a.variant]
    c = base_config()
    c.online.max_new_tokens = 8
    set_algo(c, "grpo", beta=a.beta, tis_cap=a.tis or None,
             max_completion_length=c.online.max_new_tokens, **p["loss"])
    c.model.init_from = a.init_from
    c.online.reward = REWARDS[a.reward]
    c.online.num_generations = a.k
    c.online.scale_rewards = p["scale"]
    c.online.dynamic_sampling = p.get("dynamic", False)
    c.online.epochs = 1  # on-policy: the ratio is 1 at the update (TRL's num_iterations = 1)
    c.train.batch_size = 16  # prompts per rollout (k * 16 samples)
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
