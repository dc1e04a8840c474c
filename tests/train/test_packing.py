"""Packed batches are exact: the same per-sequence log-probs as the padded batch, and the same
loss, metrics and update for every pairwise loss and SFT (with and without grad accumulation);
a packed DPO run through the CLI."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from prefjax import losses
from prefjax.data import collate_pairs, collate_sequences
from prefjax.data.packing import first_fit, micro_batch_groups, pack_batch, padding_fraction
from prefjax.lm import policy_out
from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.heads import RewardModel
from prefjax.models.llama import Llama, LlamaConfig
from prefjax.parallel import make_mesh
from prefjax.train.state import create_train_state, merge_model
from prefjax.train.step import build_train_step

V = 53
PAIRS = 4
T = 24


def _llama(rngs, impl="xla"):
    return Llama(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_layers=2,
                             num_heads=4, num_kv_heads=2, attention_impl=impl), rngs=rngs)


def _gpt2(rngs):
    return GPT2(GPT2Config(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2,
                           max_position_embeddings=T), rngs=rngs)


def _reward(rngs):
    return RewardModel(_llama(rngs), rngs=rngs)


def _rows(seed=0, n=PAIRS):
    """Ragged rows: prompts of 1-6 tokens, responses of 1-16 (lengths differ within pairs)."""
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, V, rng.integers(lo, hi)).tolist()  # noqa: E731
    return [{"prompt_ids": ids(1, 7), "chosen_ids": ids(1, 17), "rejected_ids": ids(1, 17),
             "completion_ids": ids(1, 17)} for _ in range(n)]


def _batches(paired: bool, k: int, seed=0):
    rows = _rows(seed)
    collate = collate_pairs if paired else collate_sequences
    padded = collate(rows, pad_id=0, seq_len=T)
    return padded, pack_batch(padded, pad_id=0, micro_batches=k, paired=paired)


def test_first_fit_and_groups():
    assert first_fit([5, 9, 3, 7, 2], 10) == [[1], [2, 3], [0, 4]]
    with pytest.raises(ValueError, match="does not fit"):
        first_fit([11], 10)
    g = micro_batch_groups(8, 2, paired=True)
    assert [x.tolist() for x in g] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError, match="grad_accum=3"):
        micro_batch_groups(8, 3, paired=True)


def test_pack_batch_layout():
    padded, packed = _batches(True, 2)
    for key in padded:  # the padded keys ride along unchanged
        np.testing.assert_array_equal(packed[key], padded[key])
    ids, seg, pos = (packed[k] for k in ("packed_input_ids", "packed_segment_ids",
                                         "packed_positions"))
    assert ids.shape[0] % 2 == 0 and ids.shape[0] < len(padded["input_ids"])
    r = ids.shape[0] // 2
    groups = micro_batch_groups(2 * PAIRS, 2, paired=True)
    for g, rows in enumerate(groups):
        for i in rows:  # each sequence sits, whole, in its own micro-batch's packed rows
            n = int(padded["attention_mask"][i].sum())
            at = packed["pack_index"][i, :n]
            assert (at >= g * r * T).all() and (at < (g + 1) * r * T).all()
            np.testing.assert_array_equal(ids.reshape(-1)[at], padded["input_ids"][i, :n])
            np.testing.assert_array_equal(pos.reshape(-1)[at], np.arange(n))
            assert len(set(seg.reshape(-1)[at])) == 1 and seg.reshape(-1)[at[0]] > 0
    assert padding_fraction(packed) < padding_fraction(padded)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("model_fn", [_llama, functools.partial(_llama, impl="blockwise"),
                                      _gpt2], ids=["llama", "llama_blockwise", "gpt2"])
def test_packed_logps_equal_padded(model_fn, k):
    """Per-sequence token and sequence log-probs and lengths, 1e-5, from one forward over all
    packed rows (as evaluation runs; k: micro-batch groups the rows were packed in)."""
    model = model_fn(nnx.Rngs(0))
    padded, packed = _batches(True, k)
    want = policy_out(model, padded)
    got = policy_out(model, packed)
    np.testing.assert_allclose(got.token_logps, want.token_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert np.abs(np.asarray(want.logps)).min() > 1.0  # real, nonzero sums


def test_packed_reward_scores_equal_padded():
    model = _reward(nnx.Rngs(0))
    padded, packed = _batches(True, 1)
    np.testing.assert_allclose(policy_out(model, packed).scores,
                               policy_out(model, padded).scores, rtol=1e-5, atol=1e-5)


def _extras(name, out, rng):
    near = lambda x, s: (np.asarray(x) + s * rng.standard_normal(np.shape(x))  # noqa: E731
                         ).astype(np.float32)
    if name == "p3o":
        return {"old_logps": near(out.logps, 0.1), "ref_logps": near(out.logps, 1.0),
                "rewards": rng.standard_normal(out.logps.shape).astype(np.float32)}
    if name in ("dpo", "ipo", "cdpo", "mpo", "kto"):
        return {"ref_logps": near(out.logps, 1.0)}
    return {}


# every pairwise loss (+ SFT) the pipeline can pack; PPO needs a value head (online only),
# KTO's unpaired rows have their own collate (packing treats them like pairs), and MPO packs
# without its reference-sample rows (alpha = 0; with them packing is off)
PACKED_LOSSES = [("sft", {}), ("sft", {"reduction": "sequence_sum"}), ("reward_bt", {}),
                 ("dpo", {}), ("dpo", {"loss_type": "ipo", "rpo_alpha": 0.5}), ("ipo", {}),
                 ("cdpo", {}), ("simpo", {}), ("cpo", {}), ("orpo", {}), ("mpo", {"alpha": 0.0}),
                 ("p3o", {})]


def test_every_pairwise_loss_is_covered():
    """A newly registered loss must be added here (or to the list of unpackable ones)."""
    unpackable = {"ppo", "grpo", "rloo"}  # online rollouts: never packed
    names = {n for n, _ in PACKED_LOSSES} | unpackable | {"kto"}
    assert set(losses.names()) <= names, set(losses.names()) - names


def _step(name, hparams, batch, k, model_fn, paired):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    opt = optax.sgd(0.5)
    state, sh = create_train_state(model_fn, opt, mesh=mesh, seed=0)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    step = build_train_step(losses.get(name, **hparams), opt, mesh=mesh, state_shardings=sh,
                            forward=policy_out, grad_accum=k, paired=paired, donate=False,
                            max_grad_norm=None)
    state, metrics = step(state, batch)
    return ({key: float(v) for key, v in metrics.items()}, before,
            [np.asarray(x) for x in jax.tree.leaves(state.params)])


# k = 2 (two micro-batches, each packed on its own) for the losses with token-weighted terms or
# batch statistics; that accumulation is exact for every loss is tests/train/
# test_accumulation_exact.py's check, so the other losses run at k = 1 only
ACCUMULATED = {"sft": {}, "dpo": {"loss_type": "ipo", "rpo_alpha": 0.5}, "orpo": {},
               "mpo": {"alpha": 0.0}, "p3o": {}}
STEP_CASES = [(n, h, 1) for n, h in PACKED_LOSSES] + [(n, h, 2) for n, h in ACCUMULATED.items()]


@pytest.mark.parametrize("name,hparams,k", STEP_CASES,
                         ids=[f"{n}-{'-'.join(map(str, h.values())) or 'defaults'}-{k}"
                              for n, h, k in STEP_CASES])
def test_packed_step_equals_padded(name, hparams, k):
    """Same loss, metrics and parameter update (so the same gradients) from one train step."""
    paired = name != "sft"
    model_fn = _reward if name == "reward_bt" else _llama
    padded, packed = _batches(paired, k)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    state, _ = create_train_state(model_fn, optax.sgd(0.5), mesh=mesh, seed=0)
    extra = _extras(name, policy_out(merge_model(state), padded), np.random.default_rng(3))
    (m1, p0, p1), (m2, _, p2) = (_step(name, hparams, {**b, **extra}, k, model_fn, paired)
                                 for b in (padded, packed))
    assert m1.keys() == m2.keys() and m1["nonfinite"] == 0.0
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the tolerance scales with the largest update of the step, not each array's own: an array
    # whose exact gradient is 0 (the reward head's bias cancels in r_chosen - r_rejected) moves
    # by rounding noise alone, which packing may change
    moved = max(np.abs(a1 - a0).max() for a0, a1 in zip(p0, p1, strict=True))
    assert moved > 1e-5
    for a0, a1, a2 in zip(p0, p1, p2, strict=True):
        ulp = 2 * np.finfo(np.float32).eps * np.abs(a0).max()  # rounding of the updated value
        np.testing.assert_allclose(a2 - a0, a1 - a0, rtol=1e-4, atol=1e-5 * moved + ulp)


def test_packed_dpo_smoke_run_through_the_cli(tmp_path):
    """`python -m prefjax.main --config=configs/dpo_synthetic.py:smoke` packs by default; the
    run logs its efficiency (real tokens/s, padding fraction, model FLOPs, MFU)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # packed rows row-sharded
    p = subprocess.run(
        [sys.executable, "-m", "prefjax.main", "--config=configs/dpo_synthetic.py:smoke",
         f"--workdir={tmp_path}", "--config.train.num_steps=3", "--config.train.log_every=1",
         "--config.train.grad_accum=2", "--config.train.peak_flops=1e12"],
        env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "data.packing: off" not in p.stderr
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    assert np.isfinite(last["loss"])
    assert 0.0 <= last["perf/padding_fraction"] < 1.0
    assert last["perf/model_flops_per_step"] > 0 and 0 < last["perf/mfu"]
    assert last["perf/real_tokens_per_sec"] > 0
