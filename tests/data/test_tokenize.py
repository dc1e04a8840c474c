"""Tokenization (strings and chat templates), truncation policy, and the padded batch layout."""

import logging

import datasets
import numpy as np
import pytest

from prefjax.data import (
    TruncationPolicy,
    apply_policy,
    collate_pairs,
    collate_prompts,
    collate_sequences,
    encode_row,
    prepare_preference_data,
    tokenize_dataset,
)

PAIRS = [
    {"prompt": "\n\nHuman: Hi!\n\nAssistant:", "chosen": " Hello there.", "rejected": " Go."},
    {"prompt": "Q: 2+2?", "chosen": " Four", "rejected": " Five, maybe"},
    {"prompt": "x", "chosen": " a b", "rejected": " c"},
]


def pairs_ds(rows=PAIRS, source="pairs.jsonl"):
    return prepare_preference_data(datasets.Dataset.from_list(rows), source=source)


def masked(ids, mask):
    return [int(i) for i, m in zip(ids, mask) if m]


def test_pairs_layout_and_loss_mask_decodes_to_response(char_tokenizer):
    tok = char_tokenizer
    ds, report = tokenize_dataset(pairs_ds(), tok)
    assert report.rows == 3 and report.dropped == 0 and report.truncated_responses == 0
    b = collate_pairs([ds[i] for i in range(3)], pad_id=tok.pad_token_id, seq_len=48)
    assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
    for k in b:
        assert b[k].dtype == np.int32 and b[k].shape == (6, 48)
    n = 3
    for i, row in enumerate(PAIRS):
        for j, key in ((i, "chosen"), (n + i, "rejected")):
            ids, attn, loss = b["input_ids"][j], b["attention_mask"][j], b["loss_mask"][j]
            resp = masked(ids, loss)
            # Scored tokens are exactly the response's tokens followed by EOS ...
            assert resp[-1] == tok.eos_token_id
            assert tok.decode(resp[:-1]) == row[key]
            # ... and everything before them is BOS + the prompt.
            first = int(np.argmax(loss))
            assert ids[0] == tok.bos_token_id and tok.decode(ids[1:first]) == row["prompt"]
            length = int(attn.sum())
            assert attn[:length].all() and not attn[length:].any()
            assert (ids[length:] == tok.pad_token_id).all() and loss[first:length].all()
            assert loss[0] == 0  # position 0 is never scored


def test_chat_template_rows(char_tokenizer):
    tok = char_tokenizer
    user = [{"role": "user", "content": "Hi?"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    ds, _ = tokenize_dataset(prepare_preference_data(datasets.Dataset.from_list(rows)), tok)
    b = collate_pairs([ds[0]], pad_id=0, seq_len=[16, 32, 64])
    assert b["input_ids"].shape == (2, 32)  # smallest bucket that fits
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    for j, reply in ((0, "Hello."), (1, "No.")):
        ids, loss = b["input_ids"][j], b["loss_mask"][j]
        first = int(np.argmax(loss))
        assert tok.decode(ids[:first]) == prompt_text
        resp = masked(ids, loss)
        assert resp == tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # The template already ends the turn with EOS: it must not be doubled.
        assert resp.count(tok.eos_token_id) == 1


def test_chat_rows_need_a_template(char_tokenizer):
    tok = char_tokenizer
    rows = [{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}]
    ds = prepare_preference_data(datasets.Dataset.from_list(rows), source="chat.jsonl")
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ValueError, match="chat.jsonl: row 0: .*no chat_template"):
            tokenize_dataset(ds, tok)
    finally:
        tok.chat_template = saved


def test_truncation_keeps_prompt_end_and_bos():
    bos, policy = [1], TruncationPolicy(max_prompt_length=4, max_response_length=3)
    ids = {"prompt_ids": [1, 10, 11, 12, 13, 14], "chosen_ids": [20, 21, 22, 23, 2],
           "rejected_ids": [30, 2]}
    out, tp, tr, problem = apply_policy(ids, policy, prefix=bos)
    assert out == {"prompt_ids": [1, 12, 13, 14], "chosen_ids": [20, 21, 22],
                   "rejected_ids": [30, 2]}
    assert (tp, tr, problem) == (1, 1, None)
    out, tp, tr, _ = apply_policy(ids, TruncationPolicy(max_length=8), prefix=bos)
    assert out["prompt_ids"] == ids["prompt_ids"] and out["chosen_ids"] == [20, 21]
    assert (tp, tr) == (0, 1)
    # A prompt that fills max_length is cut to leave exactly one response token.
    out, tp, tr, _ = apply_policy(ids, TruncationPolicy(max_length=4), prefix=bos)
    assert out == {"prompt_ids": [1, 13, 14], "chosen_ids": [20], "rejected_ids": [30]}
    assert (tp, tr) == (1, 2)


def test_truncation_report_counts(char_tokenizer):
    ds, report = tokenize_dataset(pairs_ds(), char_tokenizer, max_prompt_length=11,
                                  max_response_length=5)
    # Token counts (one per char, + BOS / + EOS): prompts 25, 8, 2; chosen 14, 6, 5;
    # rejected 5, 13, 3. Over the limits: one prompt, three responses.
    assert (report.truncated_prompts, report.truncated_responses, report.dropped) == (1, 3, 0)
    assert all(len(r["prompt_ids"]) <= 11 and len(r["chosen_ids"]) <= 5 for r in ds)
    assert char_tokenizer.decode(ds[0]["prompt_ids"]) == "<s>Assistant:"


def test_drop_policy_counts_and_logs_once(char_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="prefjax.data.tokenize"):
        ds, report = tokenize_dataset(pairs_ds(), char_tokenizer, max_length=14,
                                      over_long="drop")
    assert len(ds) == 1 and ds[0]["prompt"] == "x" and report.dropped == 2
    assert "pairs.jsonl: row 0: field 'prompt + chosen'" in report.first_dropped
    records = [r for r in caplog.records if r.name == "prefjax.data.tokenize"]
    assert len(records) == 1 and "dropped 2" in records[0].getMessage()


def test_error_policy_names_file_row_field(char_tokenizer):
    with pytest.raises(ValueError, match=r"pairs.jsonl: row 0: field 'prompt': 25 tokens, "
                                         r"expected at most 12 \(max_prompt_length\)"):
        tokenize_dataset(pairs_ds(), char_tokenizer, max_prompt_length=12, over_long="error")
    with pytest.raises(ValueError, match=r"row 1: field 'rejected': 13 tokens, expected at most"):
        tokenize_dataset(pairs_ds([PAIRS[2], PAIRS[1]]), char_tokenizer, max_response_length=12,
                         over_long="error")


def test_policy_arguments_validated():
    with pytest.raises(ValueError, match="over_long"):
        TruncationPolicy(over_long="cut")
    with pytest.raises(ValueError, match="max_prompt_length"):
        TruncationPolicy(max_prompt_length=0)


def test_collate_prompts_left_padded(char_tokenizer):
    tok = char_tokenizer
    ds, _ = tokenize_dataset(prepare_preference_data(
        datasets.Dataset.from_list([{"prompt": "abc"}, {"prompt": "hello world"}])), tok)
    b = collate_prompts([ds[0], ds[1]], pad_id=tok.pad_token_id, seq_len=16)
    assert b["input_ids"].shape == (2, 16) and b["input_ids"].dtype == np.int32
    for j, text in enumerate(("abc", "hello world")):
        n = len(text) + 1
        assert b["attention_mask"][j].tolist() == [0] * (16 - n) + [1] * n
        assert tok.decode(b["input_ids"][j, 16 - n:]) == "<s>" + text
        assert (b["input_ids"][j, : 16 - n] == tok.pad_token_id).all()


def test_collate_sequences_and_reference_columns(char_tokenizer):
    tok = char_tokenizer
    rows = [{"prompt": "p1", "completion": " yes"}, {"prompt": "p22", "completion": " no"}]
    ds, _ = tokenize_dataset(prepare_preference_data(datasets.Dataset.from_list(rows)), tok)
    ds = ds.add_column("ref_logps", [-1.5, -2.5])
    b = collate_sequences([ds[0], ds[1]], pad_id=0, seq_len=12)
    for j, r in enumerate(rows):
        resp = masked(b["input_ids"][j], b["loss_mask"][j])
        assert tok.decode(resp, skip_special_tokens=True) == r["completion"]
    np.testing.assert_array_equal(b["ref_logps"], np.float32([-1.5, -2.5]))
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 7, 2],
              "ref_chosen_logps": -1.0, "ref_rejected_logps": -3.0},
             {"prompt_ids": [1], "chosen_ids": [8, 2], "rejected_ids": [9, 2],
              "ref_chosen_logps": -2.0, "ref_rejected_logps": -4.0}]
    pb = collate_pairs(pairs, pad_id=0, seq_len=8)
    np.testing.assert_array_equal(pb["ref_logps"], np.float32([-1, -2, -3, -4]))
    assert pb["input_ids"][2].tolist() == [1, 5, 7, 7, 2, 0, 0, 0]


def test_collate_rejects_rows_longer_than_seq_len():
    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 8, 8, 2]}]
    with pytest.raises(ValueError, match="7 tokens but seq_len allows at most 6"):
        collate_pairs(rows, pad_id=0, seq_len=[4, 6])
    with pytest.raises(ValueError, match="empty prompt_ids"):
        collate_pairs([{"prompt_ids": [], "chosen_ids": [2], "rejected_ids": [3]}],
                      pad_id=0, seq_len=4)


def test_encode_row_plain_strings_append_eos(char_tokenizer):
    tok = char_tokenizer
    ids = encode_row({"prompt": "ab", "completion": "c"}, tok)
    assert ids == {"prompt_ids": tok("ab")["input_ids"],
                   "completion_ids": tok("c", add_special_tokens=False)["input_ids"]
                   + [tok.eos_token_id]}
