"""Held-out evaluation is the loss of the whole set, not a mean of per-batch means.

Batches with very different token counts make the two differ; the reference is a float64 NumPy
computation from one forward over the whole set (the model's log-probs themselves are tested
against HF elsewhere), on a sharded mesh for the evaluation and one device for the reference.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from prefjax import losses
from prefjax.lm import policy_out
from prefjax.parallel import make_mesh
from prefjax.pipeline.evaluation import held_out_fn, held_out_set_fn
from prefjax.train.state import create_train_state, merge_model
from prefjax.train.step import build_eval_step
from tests.train.test_step import tiny_llama
from tests.train.tiny_model import VOCAB

T = 12


def mesh8():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])


def rows(r, n: int, response: int) -> dict:
    """n right-padded rows [n, T]: a 3-token prompt and `response` scored tokens."""
    ids = r.integers(1, VOCAB, (n, T)).astype(np.int32)
    attn = np.zeros((n, T), np.int32)
    attn[:, :3 + response] = 1
    loss = np.zeros((n, T), np.int32)
    loss[:, 3:3 + response] = 1
    return {"input_ids": ids * attn, "attention_mask": attn, "loss_mask": loss}


def concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def pair_batch(r, n: int, response_c: int, response_r: int) -> dict:
    """[chosen n, rejected n] rows with reference log-probs [2n]."""
    b = concat([rows(r, n, response_c), rows(r, n, response_r)])
    b["ref_logps"] = r.normal(-10, 2, 2 * n).astype(np.float32)
    return b


def state_on(mesh):
    """(state, shardings) of the tiny Llama, the same weights on any mesh."""
    return create_train_state(tiny_llama, optax.sgd(0.1), mesh=mesh, seed=0)


def whole_set_out(state, batch: dict):
    """float64 token log-probs [N, T] and their masked sums [N] from one forward over the set."""
    out = policy_out(merge_model(state), jax.tree.map(np.asarray, batch))
    tl = np.asarray(out.token_logps, np.float64) * batch["loss_mask"]
    return tl, tl.sum(1)


def test_sft_token_mean_is_weighted_by_tokens_over_the_set():
    r = np.random.default_rng(0)
    batches = [rows(r, 4, k) for k in (1, 8, 2)]  # 4, 32 and 8 scored tokens
    loss = losses.get("sft")
    mesh = mesh8()
    state, shardings = state_on(mesh)
    got = held_out_set_fn(loss, batches, mesh=mesh, paired=False, tail_key=None)(state)

    whole = concat(batches)
    one = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tl, _ = whole_set_out(state_on(one)[0], whole)
    want = -tl.sum() / whole["loss_mask"].sum()
    assert got["num_tokens"] == whole["loss_mask"].sum() == 44
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(got["nll/per_token"], want, rtol=1e-5)

    # the old per-batch mean weights a batch of 4 tokens like one of 32: visibly different
    step = build_eval_step(loss, mesh=mesh, state_shardings=shardings, paired=False,
                           process_blocks=1)
    per_batch = held_out_fn(step, batches, mesh=mesh, paired=False, tail_key=None)(state)
    assert abs(per_batch["loss"] - want) > 1e-3 * abs(want)


def test_dpo_over_the_set_keeps_pairs_and_weights_the_nll_by_tokens():
    """DPO + RPO's chosen NLL: the pair mean over all pairs, the NLL over all chosen tokens."""
    rpo_alpha = 1.0
    r = np.random.default_rng(1)
    # pairs of unequal response lengths, batches of unequal token counts
    batches = [pair_batch(r, 4, 2, 5), pair_batch(r, 4, 9, 1), pair_batch(r, 4, 3, 3)]
    beta = 0.1
    loss = losses.get("dpo", beta=beta, rpo_alpha=rpo_alpha)
    mesh = mesh8()
    state, _ = state_on(mesh)
    got = held_out_set_fn(loss, batches, mesh=mesh, paired=True, tail_key=None)(state)

    # the whole set in one batch's layout: every chosen row, then every rejected row
    n = 4
    whole = concat([{k: v[:n] for k, v in b.items()} for b in batches]
                   + [{k: v[n:] for k, v in b.items()} for b in batches])
    _, logps = whole_set_out(state, whole)
    lengths = whole["loss_mask"].sum(1).astype(np.float64)
    m = 3 * n
    ref = whole["ref_logps"].astype(np.float64)
    z = beta * ((logps[:m] - ref[:m]) - (logps[m:] - ref[m:]))
    want = np.mean(np.logaddexp(0.0, -z)) + rpo_alpha * -logps[:m].sum() / lengths[:m].sum()
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(got["rewards/margins"], np.mean(z), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["logps/chosen"], np.mean(logps[:m]), rtol=1e-5)
    np.testing.assert_allclose(got["rewards/accuracies"], np.mean(z > 0), atol=1e-7)


def test_tail_rows_follow_the_pairs_over_the_set():
    """Batches with an extra row group flagged by a tail key ([chosen n, rejected n, tail m]):
    the set is [every chosen, every rejected, every tail row], the flag split alike."""
    r = np.random.default_rng(2)
    n, m = 2, 2
    batches = []
    for resp in ((1, 6, 2), (7, 2, 9)):
        b = concat([pair_batch(r, n, resp[0], resp[1]), {**rows(r, m, resp[2]),
                                                          "ref_logps": np.zeros(m, np.float32)}])
        b["is_tail"] = np.arange(1, m + 1, dtype=np.float32) + 10 * len(batches)  # distinct
        batches.append(b)

    def loss(out, batch):
        k = batch["is_tail"].shape[0]
        main, tail = out.logps[:-k], out.logps[-k:]
        half = main.shape[0] // 2
        nll = -tail.sum() / out.lengths[-k:].sum()
        margin = (main[:half] - main[half:]).mean()
        return margin + nll, {"margin": margin, "tail_nll": nll,
                              "flag_dot": (batch["is_tail"] * tail).sum()}

    mesh = mesh8()
    state, _ = state_on(mesh)
    got = held_out_set_fn(loss, batches, mesh=mesh, paired=True, tail_key="is_tail")(state)

    parts = [(b, slice(0, n)) for b in batches] + [(b, slice(n, 2 * n)) for b in batches]
    parts += [(b, slice(2 * n, 2 * n + m)) for b in batches]
    whole = concat([{k: v[s] for k, v in b.items() if k != "is_tail"} for b, s in parts])
    flags = np.concatenate([b["is_tail"] for b in batches]).astype(np.float64)
    _, logps = whole_set_out(state, whole)
    lengths = whole["loss_mask"].sum(1).astype(np.float64)
    c, rj, tail = logps[:2 * n], logps[2 * n:4 * n], logps[4 * n:]
    np.testing.assert_allclose(got["margin"], np.mean(c - rj), rtol=1e-5)
    np.testing.assert_allclose(got["tail_nll"], -tail.sum() / lengths[4 * n:].sum(), rtol=1e-5)
    np.testing.assert_allclose(got["flag_dot"], (flags * tail).sum(), rtol=1e-5)
