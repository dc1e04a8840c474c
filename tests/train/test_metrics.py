"""MetricsWriter (JSONL, truncation on resume), read_metrics, progress bar."""

from __future__ import annotations

import importlib.util
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.metrics import MetricsWriter, ProgressBar, read_metrics


def fake_metrics(step):
    return {"loss": 1.0 / step, "rewards/accuracies": np.float32(0.25 * (step % 4)),
            "tokens": np.int64(100 * step), "lr": jnp.asarray(1e-3)}


def test_writes_one_flushed_json_object_per_line(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        w.write(1, fake_metrics(1))
        # flushed: readable before close
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0, "rewards/accuracies": 0.25,
                                           "tokens": 100, "lr": pytest.approx(1e-3)}]
        w.write(2, {"loss": float("nan"), "eval/kl": np.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x) for x in lines)
    assert read_metrics(tmp_path)[1] == {"step": 2, "loss": "nan", "eval/kl": "inf"}


def test_resumed_run_file_equals_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    with MetricsWriter(full) as w:
        for s in range(1, 7):
            w.write(s, fake_metrics(s))
    # An interrupted run: wrote steps 1..4, died mid-line; its last checkpoint is step 2.
    with MetricsWriter(cut) as w:
        for s in range(1, 5):
            w.write(s, fake_metrics(s))
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert read_metrics(cut)[-1]["step"] == 4  # a torn last line is tolerated
    with MetricsWriter(cut, resume_step=2) as w:
        assert [r["step"] for r in read_metrics(cut)] == [1, 2]
        for s in range(3, 7):
            w.write(s, fake_metrics(s))
    assert (cut / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_fresh_run_starts_an_empty_file(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 1.0})
    with MetricsWriter(tmp_path, resume_step=None) as w:
        w.write(1, {"loss": 2.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    assert read_metrics(tmp_path / "missing") == []


def test_corrupt_line_in_the_middle_is_reported(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_tensorboard_is_optional(tmp_path):
    have = any(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorflow"))
    with MetricsWriter(tmp_path / "auto", use_tensorboard="auto") as w:
        w.write(1, {"loss": 1.0})
    assert (tmp_path / "auto" / "tensorboard").exists() == have
    if have:
        with MetricsWriter(tmp_path / "on", use_tensorboard=True) as w:
            w.write(1, {"loss": 1.0})
    else:
        with pytest.raises(ImportError, match="tensorboardX"):
            MetricsWriter(tmp_path / "on", use_tensorboard=True)


def test_progress_bar_silent_off_tty_and_shows_loss_when_enabled():
    quiet = io.StringIO()
    bar = ProgressBar(10, stream=quiet)
    assert not bar.enabled
    bar.update(1, loss=0.5, tokens=100)
    bar.close()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    bar = ProgressBar(10, stream=loud, enabled=True)
    bar.update(3, loss=0.5, tokens=1000)
    bar.close()
    text = loud.getvalue()
    assert "3/10" in text and "loss=0.5000" in text and "tok/s" in text
