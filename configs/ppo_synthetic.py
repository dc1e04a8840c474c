"""RLHF-PPO on the synthetic task from the SFT policy, rewarded by the ground-truth oracle r*.

    python -m prefjax.main --config=configs/sft_synthetic.py --workdir=workdirs/sft_synthetic
    python -m prefjax.main --config=configs/ppo_synthetic.py --workdir=workdirs/ppo_synthetic

Each step samples one response per prompt, shapes per-token rewards with a KL penalty
(`online.kl_coef`, estimator `online.kl_estimator`) against the SFT policy, fits a value head by
GAE and runs `online.epochs` clipped PPO passes, each over a fresh permutation of the rollout.
Log-probs of policy, old policy and reference are taken at the sampling temperature.
Variants: `:kl=0.1`, `:estimator=k3`, `:kl_target=1.0` (adaptive KL controller, Ziegler et al.
2019, horizon `online.kl_horizon`), `:temperature=0.7`, `:rm=workdirs/rm_synthetic` (a trained
reward model instead of the oracle; add `:value=reward` to initialise the value model from it,
as TRL does), `:smoke`.

Where the defaults differ from TRL's PPO: temperature 1 (TRL 0.7), a value head on the policy's
trunk (TRL: a separate value model from the reward model; `:value=reward`), no missing-EOS
penalty (TRL: none unless set), fixed KL coefficient (TRL's PPO: fixed; old TRL: adaptive).
"""

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, kl=0.05, estimator="k1", kl_target=0.0, temperature=1.0,
                  rm="", value="shared", init_from="workdirs/sft_synthetic")
    c = base_config()
    set_algo(c, "ppo")
    c.model.init_from = a.init_from
    c.online.kl_coef = a.kl
    c.online.kl_estimator = a.estimator
    c.online.kl_target = a.kl_target
    c.online.temperature = a.temperature
    c.online.reward = a.rm or "oracle"
    c.online.value_model = a.value
    c.train.batch_size = 64  # prompts per rollout
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
