"""RLOO (or REINFORCE++-baseline) on the synthetic task from the SFT policy, oracle reward r*.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/rloo_synthetic.py --workdir=workdirs/rloo_synthetic

k = `online.num_generations` samples per prompt; the reward is r* - kl_coef * KL(pi_old, ref)
(`online.kl_level`: per sequence, or per token with reward-to-go); RLOO's baseline is the mean
of the other k - 1 samples' rewards. Variants: `:algo=reinforce_pp` (group-mean baseline,
batch-normalised), `:k=8`, `:kl=0.1`, `:kl_level=token`, `:tis=2.0`,
`:reward=verifiable`, `:smoke`.
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo

REWARDS = {"oracle": "oracle", "verifiable": "prefjax.data.verifiable:exact_match"}


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, algo="rloo", k=4, kl=0.05, kl_level="sequence", tis=0.0,
                  reward="oracle", init_from="workdirs/sft_synthetic")
    if a.algo not in ("rloo", "reinforce_pp"):
        raise ValueError(f"algo={a.algo!r}: expected rloo or reinforce_pp")
    if a.reward not in REWARDS:
        raise ValueError(f"reward={a.reward!r}: expected one of {sorted(REWARDS)}")
    c = base_config()
    set_algo(c, "rloo", tis_cap=a.tis or None)
    c.algo = a.algo  # both records train loss "rloo"
    c.model.init_from = a.init_from
    c.online.reward = REWARDS[a.reward]
    c.online.num_generations = a.k
    c.online.kl_coef = a.kl
    c.online.kl_level = a.kl_level
    c.online.epochs = 1
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
