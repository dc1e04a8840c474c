"""grad_accum=k is exact for every registered loss: same loss, metrics and update as one batch.

Parametrized over `prefjax.losses.names()`, so a newly registered loss is covered as soon as it
is registered: it fails (naming itself) until `BUILDERS` below says how to build its batch.
Micro-batches get very different token counts (short responses in the first, long in the last),
so a mean of per-micro-batch token means would differ from the batch's token mean (checked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefjax import losses
from prefjax.parallel import make_mesh
from prefjax.train.state import create_train_state, merge_model
from prefjax.train.step import build_train_step, split_microbatches
from prefjax.typing import PolicyOut
from tests.losses import pg_batches
from tests.train.tiny_model import VOCAB, tiny_model

K = 3  # micro-batches
PAIRS = 6  # 2 pairs per micro-batch
T = 12
LR = 0.5


def forward(model, batch) -> PolicyOut:
    """Every PolicyOut field from one tiny-LM forward: log-probs (full log-softmax), a value
    head and a scalar score read off two logit channels (so PPO and reward_bt have heads)."""
    ids, mask, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logits = model(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    tok = jnp.pad(tok, ((0, 0), (1, 0))) * lm
    values = jnp.tanh(logits[..., 0]) * lm
    scores = jnp.sum(logits[..., 1] * mask, -1) / jnp.sum(mask, -1)
    return PolicyOut(tok, tok.sum(-1), lm.sum(-1).astype(jnp.float32), values=values,
                     scores=scores)


def _rows(rng, b: int, groups: int, group_of) -> dict[str, np.ndarray]:
    """b right-padded rows, prompt of 2 tokens; rows of micro-batch j get longer responses."""
    lengths = np.empty(b, int)
    for r in range(b):
        j = group_of(r)  # the micro-batch this row lands in
        lengths[r] = rng.integers(1, 3) if j == 0 else rng.integers(2 + 3 * j, 4 + 3 * j)
    lengths = np.minimum(lengths, T - 2)
    total = 2 + lengths
    mask = (np.arange(T)[None] < total[:, None]).astype(np.int32)
    ids = rng.integers(0, VOCAB, (b, T)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask,
            "loss_mask": (mask * (np.arange(T)[None] >= 2)).astype(np.int32)}


def _paired_group(r: int) -> int:
    return (r % PAIRS) // (PAIRS // K)


def _unpaired_group(r: int) -> int:
    return r // (2 * PAIRS // K)


def _near(rng, x, scale):
    """A perturbed copy of x (an old / reference policy close to the current one)."""
    return (x + scale * rng.standard_normal(x.shape)).astype(np.float32)


def _extras_pair(rng, out, batch):
    return {"ref_logps": _near(rng, out.logps, 1.0)}


def _extras_p3o(rng, out, batch):
    lm = batch["loss_mask"]
    old_tok = _near(rng, out.token_logps, 0.15) * lm
    return {"old_logps": old_tok.sum(-1), "old_token_logps": old_tok,
            "ref_logps": _near(rng, out.logps, 1.0),
            "rewards": rng.standard_normal(out.logps.shape).astype(np.float32)}


def _extras_ppo(rng, out, batch):
    lm = batch["loss_mask"]
    return {"old_token_logps": _near(rng, out.token_logps, 0.15) * lm,
            "old_values": _near(rng, out.values, 0.3) * lm,
            "advantages": rng.standard_normal(lm.shape).astype(np.float32) * lm,
            "returns": rng.standard_normal(lm.shape).astype(np.float32) * lm}


# loss name -> how to build its batch: paired layout, tail rows (MPO's reference samples) and
# the keys a loss reads beyond input_ids / attention_mask / loss_mask, made from the initial
# model's outputs so that ratios sit near 1 and clipping is partly active.
BUILDERS = {
    "sft": dict(paired=False, extras=None),
    "reward_bt": dict(paired=True, extras=None),
    "dpo": dict(paired=True, extras=_extras_pair),
    "ipo": dict(paired=True, extras=_extras_pair),
    "cdpo": dict(paired=True, extras=_extras_pair),
    "simpo": dict(paired=True, extras=None),
    "cpo": dict(paired=True, extras=None),
    "orpo": dict(paired=True, extras=None),
    "mpo": dict(paired=True, extras=_extras_pair, tail=np.asarray([1.0, 0.0, 1.0])),
    "ppo": dict(paired=False, extras=_extras_ppo),
    "p3o": dict(paired=True, extras=_extras_p3o),
    **pg_batches.BUILDERS,  # grpo, rloo, kto
}

# non-default options whose reductions differ from the defaults': token means, batch sorts,
# batch stds, sequence sums
OPTIONS = [
    ("sft", {"reduction": "sequence_sum"}),
    ("dpo", {"rpo_alpha": 0.7}),
    ("dpo", {"loss_type": ("sigmoid", "sft", "ipo"), "loss_weights": (1.0, 0.5, 0.2)}),
    ("dpo", {"loss_type": "aot"}),
    ("dpo", {"loss_type": "aot_unpaired", "label_smoothing": 0.1}),
    ("simpo", {"alpha": 0.5}),
    ("mpo", {"ref_nll_average": False, "pair_kl_direction": "ref_policy"}),
    ("p3o", {"clip_tokenwise": True}),
    ("p3o", {"scale_q": True, "avg_tokenwise": False}),
    ("p3o", {"variant": "v1"}),
    *pg_batches.OPTIONS,
]

CASES = [(name, {}) for name in losses.names()] + OPTIONS


def _batch(name: str, state):
    spec = BUILDERS.get(name)
    if spec is None:
        pytest.fail(f"loss {name!r} is registered but tests/train/test_accumulation_exact.py "
                    "has no batch builder for it: add an entry to BUILDERS (its layout and the "
                    "batch keys it reads) so that grad_accum exactness is tested for it")
    rng = np.random.default_rng(7)
    tail = spec.get("tail")
    m = 0 if tail is None else len(tail)
    b = 2 * PAIRS + m
    if spec["paired"]:
        batch = _rows(rng, b, K, lambda r: _paired_group(r) if r < 2 * PAIRS else
                      (r - 2 * PAIRS) // (m // K))
    else:
        batch = _rows(rng, b, K, _unpaired_group)
    if tail is not None:
        batch["ref_sample_mask"] = tail.astype(np.float32)
    if spec["extras"] is not None:
        out = jax.tree.map(np.asarray, forward(merge_model(state), batch))
        batch.update(spec["extras"](rng, out, batch))
    return batch, spec


@functools.cache
def _initial():
    """(mesh, optimizer, state, shardings): one initial state shared by every case (the steps
    do not donate it)."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    opt = optax.sgd(LR)
    state, sh = create_train_state(tiny_model, opt, mesh=mesh, seed=0)
    return mesh, opt, state, sh


def _run(loss_fn, batch, spec, k):
    mesh, opt, state, sh = _initial()
    tail_key = "ref_sample_mask" if "tail" in spec else None
    step = build_train_step(loss_fn, opt, mesh=mesh, state_shardings=sh, forward=forward,
                            grad_accum=k, paired=spec["paired"], tail_key=tail_key,
                            donate=False)
    new, metrics = step(state, batch)
    return ({key: float(v) for key, v in metrics.items()},
            [np.asarray(x) for x in jax.tree.leaves(state.params)],
            [np.asarray(x) for x in jax.tree.leaves(new.params)])


@pytest.mark.parametrize("name,hparams", CASES,
                         ids=[f"{n}-{'-'.join(map(str, h.values())) or 'defaults'}"
                              for n, h in CASES])
def test_grad_accum_equals_one_big_batch(name, hparams):
    batch, spec = _batch(name, _initial()[2])
    tail_key = "ref_sample_mask" if "tail" in spec else None
    tokens = split_microbatches({"t": batch["loss_mask"].sum(-1), **(
        {tail_key: batch[tail_key]} if tail_key else {})}, K, paired=spec["paired"],
        tail_key=tail_key)["t"].sum(-1)
    assert len(set(np.asarray(tokens).tolist())) == K, tokens  # unequal token counts

    loss_fn = losses.get(name, **hparams)
    (m1, p0, p1), (mk, _, pk) = (_run(loss_fn, batch, spec, k) for k in (1, K))
    assert np.isfinite(m1["loss"]) and m1["nonfinite"] == 0.0
    assert mk.keys() == m1.keys()
    for key in m1:
        np.testing.assert_allclose(mk[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    moved = 0.0
    for a0, a1, ak in zip(p0, p1, pk, strict=True):
        np.testing.assert_allclose(ak, a1, rtol=1e-5, atol=1e-6)
        # the update itself (a loose check on parameters alone could hide a small wrong grad)
        step = np.abs(a1 - a0).max()
        np.testing.assert_allclose(ak - a0, a1 - a0, rtol=1e-4, atol=1e-4 * step + 1e-8)
        moved = max(moved, step)
    assert moved > 1e-4  # the loss has a gradient here: the comparison means something


def test_mean_of_micro_batch_token_means_is_not_the_batch_token_mean():
    """The fixture really separates the two reductions (the bug of issue 16): with per-token
    NLL j + 1 in micro-batch j, the batch's token mean is not the mean of the three."""
    batch, _ = _batch("sft", _initial()[2])
    lm = batch["loss_mask"].astype(np.float32)
    group = np.asarray([_unpaired_group(r) for r in range(lm.shape[0])], np.float32)
    tok = -(1.0 + group[:, None]) * lm
    out = PolicyOut(tok, tok.sum(-1), lm.sum(-1))
    full = float(losses.sft(out, batch)[0])
    assert full == pytest.approx(float(np.sum(-tok) / np.sum(lm)))
    assert abs(full - 2.0) > 0.2  # the mean of the micro-batch token means is 2


def test_per_pair_leaf_accumulates():
    """reward_bt's optional per-pair `margin` ([n] beside the [2n] rows) is split with its pairs:
    the accumulated step equals one batch, and the margin changes the loss (it is read)."""
    batch, spec = _batch("reward_bt", _initial()[2])
    margin = np.random.default_rng(3).uniform(0.5, 2.0, PAIRS).astype(np.float32)
    loss_fn = losses.get("reward_bt")
    m1, p0, p1 = _run(loss_fn, {**batch, "margin": margin}, spec, 1)
    mk, _, pk = _run(loss_fn, {**batch, "margin": margin}, spec, K)
    no_margin = _run(loss_fn, batch, spec, 1)[0]
    assert m1["loss"] > no_margin["loss"] + 0.1
    for key in m1:
        np.testing.assert_allclose(mk[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a0, a1, ak in zip(p0, p1, pk, strict=True):
        step = np.abs(a1 - a0).max()
        np.testing.assert_allclose(ak - a0, a1 - a0, rtol=1e-4, atol=1e-4 * step + 1e-8)
