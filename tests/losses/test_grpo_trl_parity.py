"""GRPO's advantages and per-token loss equal TRL 1.16's on identical tensors, TRL's own code run
in its own environment (tests/trl_env.py; built with `make bench-trl-env` when missing).

Advantages: the `sum_then_normalize` block of `GRPOTrainer._generate_and_score_completions`,
taken from TRL's source and run on our rewards (it is inline code, not a function). Loss:
`GRPOTrainer._compute_loss` on a minimal trainer object whose `_get_per_token_logps_and_entropies`
returns our log-probs; its local `per_token_loss` is read at return, and the gradient with
respect to the per-token log-probs comes from torch autograd. TRL groups a prompt's samples in
consecutive rows, prefjax sample-major (row i*B + j): the test reorders between the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.losses.grpo import grpo_per_token
from prefjax.typing import PolicyOut
from tests.trl_env import run_in_trl

pytestmark = pytest.mark.slow

K, B, TC, P = 4, 3, 7, 2  # samples per prompt, prompts, completion columns, prompt columns

ADVANTAGES = """
import inspect, textwrap, types
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
head = 'if self.multi_objective_aggregation == "sum_then_normalize":'
start = src.index(head) + len(head)
block = textwrap.dedent(src[start:src.index('elif self.multi_objective_aggregation', start)]
                        .split("\\n", 1)[1])
for scale in ("group", "batch", "none"):
    self = types.SimpleNamespace(scale_rewards=scale, reward_weights=torch.ones(1))
    rewards_per_func = torch.tensor(inputs["rewards"], dtype=torch.float32)[:, None]
    ns = dict(self=self, rewards_per_func=rewards_per_func, torch=torch, nanstd=nanstd,
              unscorable_mask=torch.zeros(len(rewards_per_func), dtype=torch.bool),
              num_generations=int(inputs["k"]), device="cpu")
    exec(block, ns)
    outputs[scale] = torch.nan_to_num(ns["advantages"], nan=0.0).numpy()
"""

LOSS = """
import collections, sys, types
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

captured = {}

def profile(frame, event, arg):
    if event == "return" and frame.f_code is GRPOTrainer._compute_loss.__code__:
        captured["per_token_loss"] = frame.f_locals["per_token_loss"].detach().clone()

t = lambda k: torch.tensor(inputs[k], dtype=torch.float32)  # noqa: E731
for i in range(int(inputs["ncases"])):
    loss_type = str(inputs[f"loss_type_{i}"])
    level, beta = str(inputs[f"level_{i}"]), float(inputs[f"beta_{i}"])
    eps, eps_high, cap = (float(inputs[f"{k}_{i}"]) for k in ("eps", "eps_high", "cap"))
    tr = object.__new__(GRPOTrainer)
    acc = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
    tr.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        use_vllm=cap > 0, vllm_importance_sampling_correction=cap > 0,
        max_completion_length=int(inputs["max_len"]), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=acc,
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                   steps_per_generation=1),
        _metrics={"train": collections.defaultdict(list)})
    logps = t("logps").requires_grad_(True)
    tr._get_per_token_logps_and_entropies = lambda *a, **kw: (logps, torch.zeros_like(logps), None)
    mask = t("mask").long()
    batch = dict(prompt_ids=torch.ones(mask.shape[0], 2, dtype=torch.long),
                 prompt_mask=torch.ones(mask.shape[0], 2, dtype=torch.long),
                 completion_ids=torch.ones_like(mask), completion_mask=mask,
                 advantages=t("adv"), old_per_token_logps=t("old"), ref_per_token_logps=t("ref"),
                 num_items_in_batch=mask.sum())
    if cap > 0:  # TRL's token_truncate ratio (_generate_and_score_completions), max = cap
        batch["importance_sampling_ratio"] = torch.clamp(
            torch.exp((t("old") - t("sample")) * mask), max=cap)
    sys.setprofile(profile)
    try:
        loss = tr._compute_loss(None, batch)
    finally:
        sys.setprofile(None)
    loss.backward()
    outputs[f"loss_{i}"] = loss.detach().numpy()
    outputs[f"grad_{i}"] = logps.grad.numpy()
    outputs[f"per_token_{i}"] = (captured["per_token_loss"].expand_as(logps) * mask).numpy()
"""


def to_trl(x, k=K):
    """sample-major rows (i*B + j) -> TRL's prompt-major rows (j*k + i)."""
    x = np.asarray(x)
    return x.reshape(k, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def from_trl(x, k=K):
    x = np.asarray(x)
    return x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def test_group_advantages_equal_trl():
    r = np.random.default_rng(0)
    rewards = np.round(r.normal(size=K * B), 1).astype(np.float32)
    rewards[[1, 1 + B, 1 + 2 * B, 1 + 3 * B]] = 0.5  # one group with equal rewards
    got = run_in_trl(ADVANTAGES, rewards=to_trl(rewards), k=np.int64(K))
    for scale in ("group", "batch", "none"):
        ours, _ = losses.group_advantages(jnp.asarray(rewards), K, scale_rewards=scale)
        np.testing.assert_allclose(ours, from_trl(got[scale]), rtol=1e-5, atol=1e-6,
                                   err_msg=scale)


CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", epsilon_high=0.28),
    dict(loss_type="dr_grpo", max_completion_length=TC),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.05,
         epsilon_high=0.08, beta=0.1),
    dict(loss_type="dapo", tis_cap=1.05, beta=0.02),
]


def test_grpo_per_token_loss_loss_and_gradient_equal_trl():
    r = np.random.default_rng(1)
    n = K * B
    lengths = r.integers(1, TC + 1, n)
    cmask = (np.arange(TC)[None] < lengths[:, None]).astype(np.float32)
    f = lambda: r.normal(size=(n, TC)).astype(np.float32)  # noqa: E731
    lp = (-np.abs(f()) - 0.5) * cmask
    old, ref = (lp + 0.15 * f()) * cmask, (lp + 0.3 * f()) * cmask
    sample = (old + 0.1 * f()) * cmask
    rewards = r.normal(size=n).astype(np.float32)
    adv = np.asarray(losses.group_advantages(jnp.asarray(rewards), K)[0])
    inputs = dict(logps=lp, mask=cmask, old=old, ref=ref, sample=sample, adv=adv,
                  max_len=np.int64(TC), ncases=np.int64(len(CASES)))
    inputs = {k: to_trl(v) if np.ndim(v) and len(v) == n else v for k, v in inputs.items()}
    for i, c in enumerate(CASES):
        inputs.update({f"loss_type_{i}": c["loss_type"],
                       f"level_{i}": c.get("importance_sampling_level", "token"),
                       f"beta_{i}": c.get("beta", 0.0), f"eps_{i}": c.get("epsilon", 0.2),
                       f"eps_high_{i}": c.get("epsilon_high", c.get("epsilon", 0.2)),
                       f"cap_{i}": c.get("tis_cap", 0.0)})
    trl = run_in_trl(LOSS, **inputs)
    # prefjax rows: P prompt columns (mask 0), then the completion columns
    pad = lambda x: np.concatenate([np.zeros((n, P), np.float32), x], 1)  # noqa: E731
    batch = {"loss_mask": jnp.asarray(pad(cmask)), "old_token_logps": jnp.asarray(pad(old)),
             "ref_token_logps": jnp.asarray(pad(ref)), "advantages": jnp.asarray(adv),
             "sample_token_logps": jnp.asarray(pad(sample))}

    def out(x):
        return PolicyOut(x, jnp.sum(x, -1), batch["loss_mask"].sum(-1))

    for i, c in enumerate(CASES):
        hp = {k: v for k, v in c.items()}
        loss_fn = losses.get("grpo", **hp)
        loss = loss_fn(out(jnp.asarray(pad(lp))), batch)[0]
        np.testing.assert_allclose(loss, trl[f"loss_{i}"], rtol=1e-5, atol=1e-7, err_msg=str(c))
        per_tok_hp = {k: v for k, v in hp.items() if k not in ("loss_type",
                                                               "max_completion_length")}
        per_tok, _ = grpo_per_token(out(jnp.asarray(pad(lp))), batch, **per_tok_hp)
        np.testing.assert_allclose(np.asarray(per_tok)[:, P:], from_trl(trl[f"per_token_{i}"]),
                                   rtol=1e-5, atol=1e-6, err_msg=str(c))
        g = jax.grad(lambda x, f=loss_fn: f(out(x), batch)[0])(jnp.asarray(pad(lp)))
        np.testing.assert_allclose(np.asarray(g)[:, P:], from_trl(trl[f"grad_{i}"]), rtol=1e-4,
                                   atol=1e-7, err_msg=str(c))
