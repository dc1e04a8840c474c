"""The embedded known-reward task: tokenizer, r* (NumPy vs jnp), labels vs r*, full pipeline."""

import json

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from prefjax.data import (
    collate_pairs,
    collate_prompts,
    collate_sequences,
    dataset_format,
    load_preference_data,
    tokenize_dataset,
)
from prefjax.data import synthetic as S


@pytest.fixture(scope="module")
def tok():
    return S.make_tokenizer()


def test_tokenizer_roundtrip_and_save(tok, tmp_path):
    assert len(tok) == 32 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    text = "rev a k v ="
    ids = tok(text)["input_ids"]
    assert ids == [tok.bos_token_id] + [S.VOCAB.index(w) for w in text.split()]
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.decode(ids) == "<bos> " + text


# Expected values worked out by hand from the formula in the module docstring:
# r = hits / k - 0.5 * min(|L - k|, k) / k + 0.25 * [stopped at EOS].
HAND = [
    ("copy a b c =", "a b c", 1.25),
    ("copy a b c =", "a x c", 2 / 3 + 0.25),
    ("rev a b c =", "c b a", 1.25),
    ("rev a b c =", "a b c", 1 / 3 + 0.25),
    ("shift a b v =", "b c a", 1.25),  # v wraps to a
    ("copy a b c =", "a b", 2 / 3 - 0.5 / 3 + 0.25),
    ("copy a b c =", "a b c d e f g", 1 - 0.5 + 0.25),
    ("rev d e =", "e", 0.5 - 0.25 + 0.25),
]


@pytest.mark.parametrize("prompt, response, expected", HAND)
def test_reward_hand_values(prompt, response, expected):
    assert S.reward_from_text(prompt, response) == pytest.approx(expected)


def test_reward_from_ids_stop_rules():
    e, p = S.EOS_ID, S.PAD_ID
    a, b, c = (S.TOKEN_ID[w] for w in "abc")
    prompt = [p, p, S.BOS_ID] + [S.TOKEN_ID[w] for w in "copy a b c =".split()]
    assert S.reward_from_ids(prompt, [a, b, c, e, p]) == pytest.approx(1.25)
    assert S.reward_from_ids(prompt, [a, b, c]) == pytest.approx(1.0)  # never stopped
    assert S.reward_from_ids(prompt, [a, b, c, p, e]) == pytest.approx(1.0)  # pad, not EOS
    assert S.reward_from_ids(prompt, [e, a, b, c]) == pytest.approx(-0.25)  # empty response
    assert S.reward_from_ids(prompt, [a, b, c, e, a, a]) == pytest.approx(1.25)  # after EOS


def random_batch(rng, b=256, p_len=10, t_len=12):
    prompts = np.zeros((b, p_len), np.int32)
    resp = np.zeros((b, t_len), np.int32)
    for i in range(b):
        x = S.sample_prompt(rng)
        ids = [S.BOS_ID] + [S.TOKEN_ID[w] for w in x]
        prompts[i, p_len - len(ids):] = ids  # left padded, as the sampler sees them
        kind = i % 4
        if kind == 0:
            y = [S.TOKEN_ID[w] for w in S.sample_reference(x, rng)] + [S.EOS_ID]
        elif kind == 1:
            y = [S.TOKEN_ID[w] for w in S.target(x)] + [S.EOS_ID]
        else:  # arbitrary tokens, including EOS/pad anywhere or no stop at all
            y = rng.integers(0, len(S.VOCAB), size=rng.integers(0, t_len + 1)).tolist()
        resp[i, : len(y)] = y[:t_len]
        if kind == 3:
            resp[i, len(y):] = rng.integers(S.SYM0, len(S.VOCAB), size=t_len - len(y))
    return prompts, resp


def test_numpy_and_jnp_rewards_agree():
    prompts, resp = random_batch(np.random.default_rng(0))
    want = S.reward_from_ids(prompts, resp)
    got = np.asarray(jax.jit(S.reward_jnp)(prompts, resp))
    assert got.dtype == np.float32 and got.shape == (len(prompts),)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(np.unique(np.round(want, 6))) > 15  # the batch exercises many reward values


def test_reward_is_graded_and_reference_policy_spreads():
    ds = S.make_sft_dataset(2000, seed=0)
    r = np.asarray(ds["reward"], np.float64)
    np.testing.assert_allclose(
        r, [S.reward_from_text(p, c) for p, c in zip(ds["prompt"], ds["completion"])])
    assert len(np.unique(np.round(r, 6))) >= 10 and r.std() > 0.15
    assert r.max() == pytest.approx(1.25) and r.mean() < 1.0 and r.min() < 0.5
    optimal = [S.reward_from_text(p, " ".join(S.target(p.split()))) for p in ds["prompt"][:50]]
    np.testing.assert_allclose(optimal, 1.25)


def test_argmax_labels_always_prefer_higher_reward():
    ds = S.make_preference_dataset(500, seed=1, labeling="argmax")
    rc = [S.reward_from_text(p, c) for p, c in zip(ds["prompt"], ds["chosen"])]
    rr = [S.reward_from_text(p, c) for p, c in zip(ds["prompt"], ds["rejected"])]
    assert all(a > b for a, b in zip(rc, rr))
    np.testing.assert_allclose(ds["chosen_reward"][:], rc)


def test_bradley_terry_label_frequency_matches_sigmoid_of_gap():
    temp = 0.2
    ds = S.make_preference_dataset(3000, seed=2, labeling="bt", temperature=temp)
    rc = np.array([S.reward_from_text(p, c) for p, c in zip(ds["prompt"], ds["chosen"])])
    rr = np.array([S.reward_from_text(p, c) for p, c in zip(ds["prompt"], ds["rejected"])])
    gap = np.abs(rc - rr)
    keep = gap > 1e-9
    higher_chosen = (rc > rr)[keep]
    p = 1 / (1 + np.exp(-gap[keep] / temp))  # P(the higher-reward response is chosen)
    z = (higher_chosen.sum() - p.sum()) / np.sqrt((p * (1 - p)).sum())
    assert abs(z) < 4, z
    assert (1 - p).sum() > 100  # BT, unlike argmax, must often prefer the worse response
    for lo, hi in ((0, 0.15), (0.15, 0.4), (0.4, 2)):
        m = (gap[keep] > lo) & (gap[keep] <= hi)
        zb = (higher_chosen[m].sum() - p[m].sum()) / np.sqrt((p[m] * (1 - p[m])).sum())
        assert abs(zb) < 4, (lo, hi, zb)


def test_deterministic_by_seed():
    a = S.make_preference_dataset(50, seed=3)
    assert a.to_list() == S.make_preference_dataset(50, seed=3).to_list()
    assert a["chosen"][:] != S.make_preference_dataset(50, seed=4)["chosen"][:]
    assert S.make_prompt_dataset(20, 5)["prompt"][:] == S.make_prompt_dataset(20, 5)["prompt"][:]
    assert S.make_sft_dataset(20, 5).to_list() == S.make_sft_dataset(20, 5).to_list()


def test_pairs_through_the_pipeline_mask_decodes_to_response(tok, tmp_path):
    ds = S.make_preference_dataset(64, seed=6)
    path = tmp_path / "synthetic.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ds.to_list()))
    loaded = load_preference_data(path, cache_dir=str(tmp_path / "c"))
    assert dataset_format(loaded) == "pairwise" and loaded.to_list() == ds.to_list()
    tds, report = tokenize_dataset(loaded, tok, max_length=16)
    assert report.truncated_prompts == report.truncated_responses == report.dropped == 0
    assert max(len(r["prompt_ids"]) for r in tds) <= S.MAX_PROMPT_TOKENS
    assert max(len(r["chosen_ids"]) for r in tds) <= S.MAX_RESPONSE_TOKENS
    rows = [tds[i] for i in range(len(tds))]
    b = collate_pairs(rows, pad_id=tok.pad_token_id, seq_len=16)
    n = len(rows)
    prompts = collate_prompts(rows, pad_id=tok.pad_token_id, seq_len=S.MAX_PROMPT_TOKENS)
    resp = np.zeros((2 * n, 16), np.int32)
    for j in range(2 * n):
        row, key = rows[j % n], ("chosen", "rejected")[j // n]
        scored = [int(t) for t, m in zip(b["input_ids"][j], b["loss_mask"][j]) if m]
        assert scored == tok(row[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(scored, skip_special_tokens=True) == row[key]
        resp[j, : len(scored)] = scored
    # The jnp oracle scores the collated (left-padded prompt, response) pairs like the data.
    r = np.asarray(S.reward_jnp(np.concatenate([prompts["input_ids"]] * 2), resp))
    np.testing.assert_allclose(r, ds["chosen_reward"][:] + ds["rejected_reward"][:], atol=1e-6)


def test_sft_and_prompt_datasets_through_the_pipeline(tok):
    sft = S.make_sft_dataset(16, seed=7)
    assert dataset_format(sft) == "completion"
    tds, _ = tokenize_dataset(sft, tok)
    b = collate_sequences([tds[i] for i in range(16)], pad_id=0, seq_len=16)
    for j in range(16):
        scored = [int(t) for t, m in zip(b["input_ids"][j], b["loss_mask"][j]) if m]
        assert tok.decode(scored, skip_special_tokens=True) == sft[j]["completion"]
    prompts = S.make_prompt_dataset(8, seed=7)
    assert dataset_format(prompts) == "prompt_only"
    pds, _ = tokenize_dataset(prompts, tok)
    pb = collate_prompts([pds[i] for i in range(8)], pad_id=0, seq_len=8)
    for j in range(8):
        assert tok.decode(pb["input_ids"][j], skip_special_tokens=True) == prompts[j]["prompt"]
        assert pb["input_ids"][j, -1] == S.TOKEN_ID["="]


def test_chat_template_renders_synthetic_messages(tok):
    msgs = [{"role": "user", "content": "copy a b ="}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"][0] == tok.bos_token_id
    assert text.split()[-1] == "assistant"


def test_bad_labeling_arguments():
    with pytest.raises(ValueError, match="labeling"):
        S.make_preference_dataset(4, 0, labeling="vote")
    with pytest.raises(ValueError, match="temperature"):
        S.make_preference_dataset(4, 0, temperature=0.0)


def test_reward_of_samples_reads_a_sampled_pad_as_a_wrong_token_not_the_end():
    from prefjax.data.synthetic import EOS_ID, PAD_ID, reward_jnp, reward_of_samples

    tok = S.make_tokenizer()
    prompt = np.asarray([tok("copy a b c =")["input_ids"]])
    a, b, c = (tok.convert_tokens_to_ids(s) for s in "abc")
    exact = np.asarray([[a, b, c, EOS_ID, PAD_ID]])
    np.testing.assert_allclose(reward_of_samples(prompt, exact), reward_jnp(prompt, exact))
    mid_pad = np.asarray([[a, PAD_ID, c, EOS_ID, PAD_ID]])
    as_unk = np.asarray([[a, 3, c, EOS_ID, PAD_ID]])  # 3 = <unk>
    np.testing.assert_allclose(reward_of_samples(prompt, mid_pad), reward_jnp(prompt, as_unk))
    assert float(reward_jnp(prompt, mid_pad)[0]) < float(reward_of_samples(prompt, mid_pad)[0])
