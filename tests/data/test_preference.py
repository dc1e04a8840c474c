"""Loading, format detection and validation of preference files (json, jsonl, parquet, csv)."""

import csv
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefjax.data import (
    BadRowError,
    dataset_format,
    dataset_source,
    load_preference_data,
    prepare_preference_data,
)

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
]


def write(path, rows):
    """Write rows (list of dicts) in the format named by the file's extension."""
    ext = path.suffix
    if ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif ext == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".parquet", ".csv"])
def test_pairwise_every_file_type(tmp_path, ext):
    path = write(tmp_path / f"pairs{ext}", PAIRS)
    ds, report = load_preference_data(path, cache_dir=str(tmp_path / "cache"), return_report=True)
    assert dataset_format(ds) == "pairwise" and report.format == "pairwise"
    assert dataset_source(ds) == str(path)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ds] == PAIRS
    assert report.num_rows == 3 and report.skipped == 0


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_anthropic_hh_split_at_last_assistant_turn(tmp_path, ext):
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a fact.\n\nAssistant:"
    rows = [
        {"chosen": prompt + " Water is wet.", "rejected": prompt + " No."},
        # The responses share their first word: the prompt must still end at the marker.
        {"chosen": prompt + " The sky is blue.", "rejected": prompt + " The end."},
    ]
    ds = load_preference_data(write(tmp_path / f"hh{ext}", rows), cache_dir=str(tmp_path / "c"))
    assert dataset_format(ds) == "hh"
    assert ds["prompt"][:] == [prompt, prompt]
    assert ds["chosen"][:] == [" Water is wet.", " The sky is blue."]
    assert ds["rejected"][:] == [" No.", " The end."]


def test_conversational_explicit_and_implicit_prompt(tmp_path):
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    good = [{"role": "assistant", "content": "Hello."}]
    bad = [{"role": "assistant", "content": "Go away."}]
    explicit = [{"prompt": user, "chosen": good, "rejected": bad},
                # UltraFeedback style: chosen/rejected repeat the prompt messages.
                {"prompt": user, "chosen": user + good, "rejected": user + bad}]
    implicit = [{"chosen": user + good, "rejected": user + bad}]
    c = str(tmp_path / "c")
    ds = load_preference_data(write(tmp_path / "exp.jsonl", explicit), cache_dir=c)
    ds2 = load_preference_data(write(tmp_path / "imp.parquet", implicit), cache_dir=c)
    for d in (ds, ds2):
        assert dataset_format(d) == "conversational"
        for row in d:
            assert (row["prompt"], row["chosen"], row["rejected"]) == (user, good, bad)


def test_string_prompt_with_message_responses_becomes_a_user_message(tmp_path):
    rows = [{"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Bye."}]}]
    ds = load_preference_data(write(tmp_path / "x.jsonl", rows), cache_dir=str(tmp_path / "c"))
    assert ds[0]["prompt"] == [{"role": "user", "content": "Hi?"}]


def test_unpaired_completion_and_prompt_only(tmp_path):
    c = str(tmp_path / "c")
    unpaired = [{"prompt": "a?", "completion": " yes", "label": True},
                {"prompt": "b?", "completion": " no", "label": 0}]
    ds = load_preference_data(write(tmp_path / "u.jsonl", unpaired), cache_dir=c)
    assert dataset_format(ds) == "unpaired" and ds["label"][:] == [True, False]
    sft = load_preference_data(write(tmp_path / "s.csv", [{"prompt": "a?", "completion": " yes"}]),
                               cache_dir=c)
    assert dataset_format(sft) == "completion" and sft[0]["completion"] == " yes"
    path = write(tmp_path / "p.parquet", [{"prompt": "a?"}, {"prompt": "b"}])
    prompts = load_preference_data(path, cache_dir=c)
    assert dataset_format(prompts) == "prompt_only" and prompts["prompt"][:] == ["a?", "b"]


def test_folder_and_extra_columns_kept(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.jsonl", [dict(r, score=i) for i, r in enumerate(PAIRS)])
    ds = load_preference_data(folder, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 3 and ds["score"][:] == [0, 1, 2] and dataset_format(ds) == "pairwise"


def test_hub_name_offline_names_the_source(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="some-org/some-dataset.*offline"):
        load_preference_data("some-org/some-dataset")


def test_missing_local_file_and_bad_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_data(tmp_path / "nope.jsonl")
    path = write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"odd.jsonl.*cannot detect.*\['answer', 'question'\]"):
        load_preference_data(path, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"'pairwise' needs columns.*missing \['rejected'\]"):
        load_preference_data(write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}]),
                             format="pairwise", cache_dir=str(tmp_path / "c"))


BAD_ROWS = {
    "missing": ({"prompt": "p", "chosen": " a"}, "rejected", "is missing"),
    "empty": ({"prompt": "p", "chosen": " a", "rejected": "  "}, "rejected", "is empty"),
    "non_string": ({"prompt": "p", "chosen": " a", "rejected": 5}, "rejected",
                   "expected a non-empty response string, got int"),
    "empty_prompt": ({"prompt": "", "chosen": " a", "rejected": " b"}, "prompt", "is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_message_names_file_row_field(tmp_path, case):
    bad, field, expected = BAD_ROWS[case]
    path = write(tmp_path / "bad.jsonl", PAIRS[:2] + [bad] + PAIRS[2:])
    with pytest.raises(BadRowError) as e:
        load_preference_data(path, cache_dir=str(tmp_path / "c"))
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and f"field {field!r}" in msg and expected in msg


def test_bad_hh_and_messages_rows(tmp_path):
    c = str(tmp_path / "c")
    hh = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}]
    with pytest.raises(BadRowError, match=r"hh.jsonl: row 0: field 'rejected'.*share a prompt"):
        load_preference_data(write(tmp_path / "hh.jsonl", hh), cache_dir=c)
    msgs = [{"prompt": [{"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": ""}]}]
    with pytest.raises(BadRowError, match=r"m.jsonl: row 0: field 'rejected'.*non-empty assistant"):
        load_preference_data(write(tmp_path / "m.jsonl", msgs), cache_dir=c)
    labels = [{"prompt": "q", "completion": "a", "label": "maybe"}]
    with pytest.raises(BadRowError, match=r"row 0: field 'label': expected a boolean"):
        load_preference_data(write(tmp_path / "l.jsonl", labels), cache_dir=c)


def test_skip_drops_counts_and_logs_once(tmp_path, caplog):
    rows = [PAIRS[0], BAD_ROWS["empty"][0], PAIRS[1], BAD_ROWS["non_string"][0], PAIRS[2]]
    path = write(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="prefjax.data.preference"):
        ds, report = load_preference_data(path, on_bad_row="skip", return_report=True,
                                          cache_dir=str(tmp_path / "c"))
    assert ds["chosen"][:] == [p["chosen"] for p in PAIRS]
    assert report.skipped == 2 and report.num_rows == 3
    assert "row 1" in report.first_errors[0] and "row 3" in report.first_errors[1]
    warnings = [r for r in caplog.records if r.name == "prefjax.data.preference"]
    assert len(warnings) == 1 and "skipped 2 bad rows of 5" in warnings[0].getMessage()


def test_error_mode_counts_other_bad_rows(tmp_path):
    rows = [PAIRS[0], BAD_ROWS["empty"][0], BAD_ROWS["non_string"][0]]
    with pytest.raises(BadRowError, match=r"row 1: .*\(1 more bad rows"):
        load_preference_data(write(tmp_path / "m.jsonl", rows), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="on_bad_row"):
        load_preference_data(write(tmp_path / "ok.jsonl", PAIRS), on_bad_row="ignore")


def test_identical_pairs_are_kept_and_counted(tmp_path, caplog):
    same = {"prompt": "p", "chosen": " same", "rejected": " same"}
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    c = str(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="prefjax.data.preference"):
        ds, report = load_preference_data(write(tmp_path / "s.jsonl", PAIRS + [same]),
                                          return_report=True, cache_dir=c)
    assert len(ds) == len(PAIRS) + 1 and report.identical == 1 and report.skipped == 0
    assert any("1 of 4 pairs have chosen == rejected" in r.getMessage() for r in caplog.records)
    ds, report = load_preference_data(write(tmp_path / "hh.jsonl", [hh]), return_report=True,
                                      cache_dir=c)
    assert report.identical == 1 and ds["chosen"][0] == ds["rejected"][0] == " b"
    assert ds["prompt"][0] == "\n\nHuman: a\n\nAssistant:"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(PAIRS[0]), "", json.dumps(PAIRS[1]), '{"prompt": "p", "chosen": "a",',
             json.dumps(PAIRS[2])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 4: not valid JSON"):
        load_preference_data(path, cache_dir=str(tmp_path / "c"))
    path.write_text(json.dumps(PAIRS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2: expected a JSON object, got list"):
        load_preference_data(path, cache_dir=str(tmp_path / "c2"))


def test_prepare_in_memory_dataset():
    import datasets

    ds = prepare_preference_data(datasets.Dataset.from_list(PAIRS), source="mem")
    assert dataset_format(ds) == "pairwise" and dataset_source(ds) == "mem"
