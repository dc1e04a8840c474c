"""prefjax.credit (per-token implicit rewards) against prefjax.lm and a float64 NumPy
log-softmax; the synthetic task's per-token error labels against hand-made examples and r*."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax import credit, lm
from prefjax.data import synthetic as syn
from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.hf import save_hf
from prefjax.models.llama import Llama, LlamaConfig

V = 96
BETA = 0.3


def tiny(kind: str, seed: int):
    # initializer_range well above HF's 0.02 so log-probs are O(1) and differ between seeds
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                         max_position_embeddings=64, initializer_range=0.3)
        return GPT2(cfg, rngs=nnx.Rngs(seed))
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, initializer_range=0.3)
    return Llama(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    return tiny(request.param, 0), tiny(request.param, 1)


PROMPT_LENS, RESPONSE_LENS = (3, 5, 2, 4), (4, 2, 6, 1)


def right_padded(t: int = 12, seed: int = 0) -> dict:
    """Prompt + response rows of different lengths, right-padded (collate_pairs' layout)."""
    r = np.random.default_rng(seed)
    b = len(PROMPT_LENS)
    ids, mask, loss = (np.zeros((b, t), np.int32) for _ in range(3))
    for i, (p, n) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids[i, :p + n] = r.integers(1, V, p + n)
        mask[i, :p + n] = 1
        loss[i, p:p + n] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def left_padded(batch: dict, mask: np.ndarray) -> dict:
    """The same rows (right-padded to `mask`) with their padding moved to the left."""
    shift = mask.shape[1] - mask.sum(1)
    return {k: np.stack([np.roll(row, s) for row, s in zip(v, shift)]) for k, v in batch.items()}


def np_token_logps(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 log-softmax with the lm alignment (column t scored if tokens t-1, t are real)."""
    z = logits.astype(np.float64)[:, :-1]
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    lp = np.take_along_axis(z, ids[:, 1:, None], -1)[..., 0] - lse
    return np.pad(lp * (mask[:, 1:] * mask[:, :-1]), ((0, 0), (1, 0)))


@pytest.mark.parametrize("chunk", [None, 40, 7])
def test_masked_sum_is_the_sequence_reward(models, chunk):
    policy, reference = models
    batch = right_padded()
    r = np.asarray(credit.token_rewards(policy, reference, batch, beta=BETA, chunk_size=chunk))
    assert r.dtype == np.float32 and r.shape == batch["input_ids"].shape
    j = {k: jnp.asarray(v) for k, v in batch.items()}
    seq = [np.asarray(lm.sequence_logps(m, j["input_ids"], j["attention_mask"], j["loss_mask"],
                                        chunk_size=chunk)) for m in (policy, reference)]
    np.testing.assert_allclose(r.sum(1), BETA * (seq[0] - seq[1]), rtol=1e-5, atol=1e-5)
    # per token against float64 NumPy log-softmax of each model's logits
    ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    lp = [np_token_logps(np.asarray(m(j["input_ids"], j["attention_mask"])), ids, mask)
          for m in (policy, reference)]
    want = BETA * (lp[0] - lp[1]) * loss
    np.testing.assert_allclose(r, want, atol=2e-5)
    assert np.abs(want[loss == 1]).min() > 1e-3  # nonzero on every scored token: has teeth


def test_zero_off_the_loss_mask_and_on_padding(models):
    policy, reference = models
    batch = right_padded()
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][0, -1] = 1  # a loss-mask 1 on a padding column must not be scored
    r = np.asarray(credit.token_rewards(policy, reference, batch, beta=BETA))
    assert np.all(r[batch["loss_mask"] == 0] == 0.0)
    assert np.all(r[batch["attention_mask"] == 0] == 0.0)
    assert np.all(r[(batch["loss_mask"] == 1) & (batch["attention_mask"] == 1)] != 0.0)
    # without a loss_mask every real token but the first of each row is scored
    del batch["loss_mask"]
    r = np.asarray(credit.token_rewards(policy, reference, batch, beta=BETA))
    scored = batch["attention_mask"].astype(bool) & (np.arange(r.shape[1]) > 0)[None]
    assert np.all(r[~scored] == 0.0) and np.all(r[scored] != 0.0)


def test_identical_under_left_and_right_padding(models):
    policy, reference = models
    right = right_padded()
    left = left_padded(right, right["attention_mask"])
    assert not np.array_equal(left["input_ids"], right["input_ids"])
    r_right = np.asarray(credit.token_rewards(policy, reference, right, beta=BETA, chunk_size=40))
    r_left = np.asarray(credit.token_rewards(policy, reference, left, beta=BETA, chunk_size=40))
    moved = left_padded({"r": r_right}, right["attention_mask"])["r"]
    np.testing.assert_allclose(moved, r_left, atol=1e-5)
    assert np.abs(r_left).max() > 0.1


def test_one_compilation_per_shape(models):
    policy, reference = models
    batch = right_padded(seed=3)
    credit.token_rewards(policy, reference, batch, beta=0.1)
    n = credit._token_rewards._cache_size()
    a = credit.token_rewards(policy, reference, batch, beta=0.1)
    b = credit.token_rewards(policy, reference, right_padded(seed=4), beta=0.7)
    assert credit._token_rewards._cache_size() == n  # new beta and data, same program
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_bad_batch_is_named(models):
    policy, reference = models
    batch = right_padded()
    with pytest.raises(ValueError, match="loss_mask"):
        credit.token_rewards(policy, reference, {**batch, "loss_mask": batch["loss_mask"][:, 1:]},
                             beta=BETA)
    with pytest.raises(KeyError, match="attention_mask"):
        credit.token_rewards(policy, reference, {"input_ids": batch["input_ids"]}, beta=BETA)


def test_load_run_resolves_policy_and_reference(tmp_path):
    policy, reference = tiny("llama", 0), tiny("llama", 1)
    save_hf(policy, tmp_path / "run" / "export")
    save_hf(reference, tmp_path / "ref" / "export")  # a run workdir stands for its export
    config = {"algo": "dpo", "seed": 0, "model": {"source": "tiny", "init_from": "elsewhere"},
              "reference": {"source": str(tmp_path / "ref")}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    pol, ref, cfg = credit.load_run(tmp_path / "run")
    assert cfg == config
    batch = right_padded()
    want = credit.token_rewards(policy, reference, batch, beta=BETA)
    np.testing.assert_allclose(credit.token_rewards(pol, ref, batch, beta=BETA), want, atol=1e-6)
    # without reference.source the reference is the initial policy (model.init_from)
    config["reference"]["source"] = ""
    config["model"]["init_from"] = str(tmp_path / "ref" / "export")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert credit.reference_source(config) == config["model"]["init_from"]
    _, ref2, _ = credit.load_run(tmp_path / "run")
    np.testing.assert_allclose(credit.token_rewards(pol, ref2, batch, beta=BETA), want, atol=1e-6)
    config["model"]["init_from"] = str(tmp_path / "missing")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="missing"):
        credit.load_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="config.json"):
        credit.load_run(tmp_path / "ref")
    with pytest.raises(FileNotFoundError, match="export"):
        (tmp_path / "noexport").mkdir()
        (tmp_path / "noexport" / "config.json").write_text(json.dumps(config))
        credit.load_run(tmp_path / "noexport")


def test_response_slices():
    loss = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert credit.response_slices(loss) == [slice(1, 3), slice(0, 0), slice(0, 4)]


# ---- the synthetic task's per-token error labels ----

def ids(words: str) -> np.ndarray:
    return np.array([syn.TOKEN_ID[w] for w in words.split()], np.int64)


@pytest.mark.parametrize("prompt, response, errors, first", [
    # copy a b c: target a b c
    ("copy a b c =", "a b c <eos>", "0 0 0 0", -1),
    ("copy a b c =", "a q c <eos>", "0 1 0 0", 1),  # a wrong symbol
    ("copy a b c =", "a b <eos>", "0 0 1", 2),  # stops early: the <eos> is the error
    ("copy a b c =", "q b <eos>", "1 0 1", 0),
    ("copy a b c =", "a b c d e <eos>", "0 0 0 1 1 0", 3),  # extra tokens, then a fine <eos>
    # rev a b c: target c b a
    ("rev a b c =", "c b a <eos> <pad>", "0 0 0 0 0", -1),
    ("rev a b c =", "a b c <eos>", "1 0 1 0", 0),
    ("rev a b c =", "c b a <pad> <pad>", "0 0 0 1 0", 3),  # stops at <pad>: missing <eos>
    ("rev a b c =", "c b a", "0 0 0", 3),  # missing <eos> one past the last id
    ("rev a b c =", "c b", "0 0", 2),  # a missing token past the end
    # shift a v: target b a (v wraps to a)
    ("shift a v =", "b a <eos>", "0 0 0", -1),
    ("shift a v =", "b v <eos>", "0 1 0", 1),
    ("shift a v =", "a v <eos>", "1 1 0", 0),
    ("shift a v =", "b a a <eos>", "0 0 1 0", 2),
    ("shift a v =", "<eos> b a", "1 0 0", 0),  # empty response: <eos> at 0 (k = 2)
])
def test_error_labels_hand_made(prompt, response, errors, first):
    p, y = ids("<bos> " + prompt), ids(response)
    got = syn.token_errors(p, y)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, np.array(errors.split(), int).astype(bool))
    assert syn.first_error(p, y) == first
    assert (first == -1) == (syn.reward_from_ids(p, y) == 1.25)


def test_error_labels_batched_and_consistent_with_reward():
    """On reference-policy responses (with <eos>) and random mutations of them: no error iff r*
    is maximal, and r* is what the error mask says (matches, length term, <eos> term)."""
    rng = np.random.default_rng(0)
    n, width = 600, syn.MAX_RESPONSE_TOKENS + 1
    P = np.zeros((n, syn.MAX_PROMPT_TOKENS), np.int64)
    Y = np.zeros((n, width), np.int64)
    for i in range(n):
        x = syn.sample_prompt(rng)
        y = list(ids(" ".join(syn.sample_reference(x, rng)))) + [syn.EOS_ID]
        if i % 3 == 0 and len(y) > 1:  # mutate: a random token (symbol, <eos> or <pad>)
            y[rng.integers(len(y))] = rng.choice([syn.EOS_ID, syn.PAD_ID, *range(syn.SYM0, 32)])
        p = ids("<bos> " + " ".join(x))
        P[i, :len(p)], Y[i, :len(y)] = p, y  # prompt padding is ignored, like r*'s
    err, first = syn.token_errors(P, Y), syn.first_error(P, Y)
    assert err.shape == Y.shape and first.shape == (n,)
    reward = syn.reward_from_ids(P, Y)
    np.testing.assert_array_equal(first == -1, reward == 1.25)
    assert 0.05 < np.mean(first == -1) < 0.5  # both kinds are present
    for i in range(n):
        np.testing.assert_array_equal(err[i], syn.token_errors(P[i], Y[i]))
        hit = np.flatnonzero(err[i])
        assert first[i] == (hit[0] if len(hit) else -1)
        k = len(syn.target([syn.VOCAB[t] for t in P[i]]))
        stop = np.flatnonzero((Y[i] == syn.EOS_ID) | (Y[i] == syn.PAD_ID))[0]
        ended = Y[i, stop] == syn.EOS_ID
        m = min(stop, k)
        want = (syn.W_MATCH * (m - err[i, :m].sum()) / k - syn.W_LEN * min(abs(stop - k), k) / k
                + syn.W_EOS * ended)
        assert reward[i] == pytest.approx(want)
        # the end is wrong exactly when the response does not stop with <eos> at k
        assert err[i, m] == (not (stop == k and ended))


def test_load_run_rebuilds_a_random_init_reference(tmp_path):
    """A run from a random init ("tiny") has no reference folder: the reference is rebuilt from
    the config at its seed, as the trainer built it (here from a partial, older config.json)."""
    from prefjax.config import base_config
    from prefjax.train import build

    c = base_config()
    decoder = build.decoder_fn(c, syn.make_tokenizer())
    want_ref, policy = build.materialize(decoder, 3), build.materialize(decoder, 4)
    save_hf(policy, tmp_path / "export")
    (tmp_path / "config.json").write_text(json.dumps(
        {"algo": "dpo", "seed": 3, "model": {"source": "tiny", "init_from": ""}}))
    pol, ref, _ = credit.load_run(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(syn.SYM0, 32, (2, 10)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    want = np.asarray(credit.token_rewards(policy, want_ref, batch, beta=1.0))
    np.testing.assert_allclose(credit.token_rewards(pol, ref, batch, beta=1.0), want, atol=1e-6)
    assert np.abs(want).max() > 0.01


@pytest.mark.parametrize("mode", ["precomputed", "live"])
def test_load_run_restores_the_policy_from_a_checkpoint(tmp_path, mode):
    """`step=` (or a run without export) restores the policy from the run's checkpoint: the
    final checkpoint's policy equals the exported one (float32 export of the same parameters),
    with the live reference, which checkpoints leave out, rebuilt from its source."""
    import shutil

    import jax

    from prefjax.main import run
    from tests.train.test_pipeline import smoke

    c = smoke("dpo_synthetic", reference__mode=mode, train__num_steps=4, train__save_every=2,
              train__export_hf=True)
    run(c, str(tmp_path))
    exported, ref, _ = credit.load_run(tmp_path)
    last, ref2, _ = credit.load_run(tmp_path, step=4)
    earlier, _, _ = credit.load_run(tmp_path, step=2)
    flat = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    for a, b in zip(flat(last), flat(exported), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(flat(earlier), flat(last)))
    for a, b in zip(flat(ref), flat(ref2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shutil.rmtree(tmp_path / "export")  # no export: the latest checkpoint stands in for it
    latest, _, _ = credit.load_run(tmp_path)
    for a, b in zip(flat(latest), flat(exported), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
