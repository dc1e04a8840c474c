"""PPO's KL-shaped per-token rewards, GAE returns and whitened advantages against TRL's own code
on identical tensors.

TRL 1.16 has no PPO, so the reference is the last release that has it, TRL 0.24.0: the block of
`PPOTrainer.train` from its padding masks to the whitened advantages (inline code, not a
function), taken from the wheel's source and run in TRL's environment with `trl.core`'s
`masked_whiten` (tests/trl_env.py). prefjax's side is `losses.records.ppo_batch`, what the
online pipeline runs after scoring a rollout.

The one convention that differs: TRL adds the score one position AFTER a row's last token (the
first pad, `sequence_lengths + 1`) and keeps the value there, prefjax (like InstructGPT's
description) at the last token with V = 0 after it. So the rows agree exactly when every
response fills the width (TRL then uses the last token too), or with gamma = lam = 1 (the
advantages telescope to the same sums), and in general equal prefjax run on TRL's layout: the
mask extended by that one position (log-probs equal there, as TRL's INVALID_LOGPROB fill makes
them), advantages whitened over the real tokens.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from prefjax.losses.ppo import gae, kl_shaped_rewards
from prefjax.losses.ppo import whiten as whiten_fn
from prefjax.losses.records import ppo_batch
from prefjax.typing import PolicyOut
from tests.trl_env import legacy_trl_source, run_in_trl

pytestmark = pytest.mark.slow

B, N = 6, 9  # rows, response columns

START = "response_idxs = torch.arange(responses.shape[1]"
END = "advantages = torch.masked_fill(advantages, padding_mask, 0)"

TRL_CODE = """
import ast, textwrap, types
import torch

core = ast.parse(CORE)
helpers = ast.Module([f for f in core.body if isinstance(f, ast.FunctionDef)
                      and f.name in ("masked_mean", "masked_var", "masked_whiten")], [])
import typing
ns = {"torch": torch, "Optional": typing.Optional}
exec(compile(helpers, "trl/core.py", "exec"), ns)
head = TRAINER.index(START)
line0 = TRAINER.rindex("\\n", 0, head) + 1
block = textwrap.dedent(TRAINER[line0:TRAINER.index("\\n", TRAINER.index(END))])
for i in range(int(inputs["ncases"])):
    t = lambda k: torch.tensor(inputs[f"{k}_{i}"])  # noqa: E731
    args = types.SimpleNamespace(kl_coef=float(inputs[f"kl_coef_{i}"]),
                                 kl_estimator=str(inputs[f"estimator_{i}"]),
                                 whiten_rewards=bool(inputs[f"whiten_{i}"]),
                                 gamma=float(inputs[f"gamma_{i}"]), lam=float(inputs[f"lam_{i}"]))
    env = dict(ns, args=args, INVALID_LOGPROB=float(INVALID), responses=t("responses"),
               sequence_lengths=t("seq").long(), logprobs=t("logps"), ref_logprobs=t("ref"),
               values=t("values"), scores=t("scores"))
    exec(block, env)
    for k in ("rewards", "advantages", "returns"):
        outputs[f"{k}_{i}"] = env[k].numpy()
"""

CASES = [  # (kl estimator, whiten rewards, gamma, lam, every row fills the width)
    ("k1", False, 1.0, 0.95, True),
    ("k3", True, 0.9, 0.5, True),
    ("k1", False, 1.0, 1.0, False),
    ("k1", False, 1.0, 0.95, False),
    ("k3", True, 0.9, 0.5, False),
]


def _case(seed: int, full: bool) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    f = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    # index of each row's last real token; ragged rows end before the last column
    seq = np.full(B, N - 1) if full else r.integers(0, N - 1, size=B)
    return dict(seq=seq.astype(np.int64), responses=r.integers(3, 50, size=(B, N)),
                logps=-np.abs(f(B, N)) - 0.5, ref=-np.abs(f(B, N)) - 0.5, values=f(B, N),
                scores=f(B))


def _masks(d, shifted: bool):
    """(mask the rewards and GAE run over, the real tokens), [B, N] float32."""
    idx = np.arange(N)[None]
    real = idx <= d["seq"][:, None]
    mask = (idx <= np.minimum(d["seq"] + 1, N - 1)[:, None]) if shifted else real
    return mask.astype(np.float32), real


def _prefjax(d, estimator, whiten, gamma, lam, shifted: bool) -> dict[str, np.ndarray]:
    """rewards, advantages, returns [B, N]. Unshifted: `ppo_batch`, what the pipeline runs.
    Shifted (TRL's layout): its building blocks over the one-token-longer mask, advantages
    whitened over the real tokens."""
    mask, real = _masks(d, shifted)
    # TRL fills both log-probs with one constant after the last token: the KL there is 0
    ref = np.where(real, d["ref"], d["logps"])
    r = kl_shaped_rewards(d["scores"], d["logps"], ref, mask, kl_coef=0.05, estimator=estimator)
    r = whiten_fn(r, mask, shift_mean=False) if whiten else r
    if not shifted:
        o = types.SimpleNamespace(kl_coef=0.05, kl_estimator=estimator, whiten_rewards=whiten,
                                  gamma=gamma, lam=lam)
        out = PolicyOut(logps=None, lengths=None, token_logps=d["logps"], values=d["values"])
        got = ppo_batch({"loss_mask": mask}, out,
                        PolicyOut(logps=None, lengths=None, token_logps=ref), d["scores"], o)
        return {"rewards": np.asarray(r), "advantages": np.asarray(got["advantages"]),
                "returns": np.asarray(got["returns"])}
    adv, ret = gae(r, d["values"], mask, gamma=gamma, lam=lam)
    return {"rewards": np.asarray(r), "advantages": np.asarray(whiten_fn(adv, real)),
            "returns": np.asarray(ret)}


def test_ppo_rewards_advantages_match_trl():
    trainer = legacy_trl_source("trl/trainer/ppo_trainer.py")
    core = legacy_trl_source("trl/core.py")
    invalid = trainer.split("INVALID_LOGPROB = ", 1)[1].split("\n", 1)[0]
    inputs = {"ncases": len(CASES)}
    cases = []
    for i, (est, whiten, gamma, lam, full) in enumerate(CASES):
        d = _case(i, full)
        cases.append(d)
        inputs.update({f"{k}_{i}": v for k, v in d.items()})
        inputs.update({f"kl_coef_{i}": 0.05, f"estimator_{i}": est, f"whiten_{i}": whiten,
                       f"gamma_{i}": gamma, f"lam_{i}": lam})
    code = (f"TRAINER = {trainer!r}\nCORE = {core!r}\nSTART = {START!r}\nEND = {END!r}\n"
            f"INVALID = {invalid!r}\n" + TRL_CODE)
    trl = run_in_trl(code, **inputs)
    for i, (est, whiten, gamma, lam, full) in enumerate(CASES):
        d = cases[i]
        # full rows and gamma = lam = 1: prefjax's own layout; otherwise TRL's (see the doc)
        shifted = not full and not (gamma == lam == 1.0)
        got = _prefjax(d, est, whiten, gamma, lam, shifted)
        mask, real = _masks(d, shifted)
        for k, m in (("advantages", real), ("returns", real), ("rewards", mask > 0)):
            if k == "rewards" and not (shifted or full):
                continue  # gamma = lam = 1 on ragged rows: the score sits in another slot
            np.testing.assert_allclose(got[k][m], trl[f"{k}_{i}"][m], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{k}, case {CASES[i]}")
        if not full:  # and the conventions do differ at lam < 1 on ragged rows
            own = _prefjax(d, est, whiten, gamma, 0.5, False)["advantages"]
            theirs = _prefjax(d, est, whiten, gamma, 0.5, True)["advantages"]
            assert np.abs(own - theirs)[real].max() > 1e-2
