"""A LoRA run through the pipeline: DPO trains with its base (adapters off) as the live
reference and no second model, checkpoints hold only the adapters, a resumed run equals an
uninterrupted one, and both exports (merged HF folder, PEFT folder) give the trained logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefjax.main import run
from prefjax.metrics import read_metrics
from prefjax.pipeline import models
from tests.train.test_offline import ROOT, assert_same_training, load_config

IDS = (np.arange(20).reshape(2, 10) * 5) % 30 + 3


def lora_smoke(**over):
    c = load_config(ROOT / "configs" / "dpo_lora_synthetic.py", "smoke")
    for key, value in over.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def no_second_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a LoRA run with a live reference built a reference model")

    monkeypatch.setattr(models, "reference_model", refuse)


def test_dpo_lora_smoke_trains_checkpoints_adapters_and_exports(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    import torch
    from transformers import AutoModelForCausalLM

    no_second_model(monkeypatch)
    # one batch of 16 training pairs, seen every step: the adapters must fit it (a random-init
    # smoke model does not generalise to held-out pairs in a few steps, full fine-tuning alike)
    c = lora_smoke(train__num_steps=12, train__lr=1e-2, train__batch_size=16,
                   data__num_train=16, train__log_every=1, train__eval_every=6,
                   train__save_every=6)
    run(c, str(tmp_path))
    recs = read_metrics(tmp_path)
    loss = [r["loss"] for r in recs if "loss" in r]
    # B = 0 at the start: the policy is its reference, the DPO loss exactly log 2
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert loss[-1] < math.log(2) - 0.05 and np.all(np.diff(loss[2:]) < 0), loss

    meta = ocp.PyTreeCheckpointer().metadata(tmp_path / "checkpoints" / "12" / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    leaves = [tuple(str(k) for k in path) for path in _paths(tree)]
    arrays = [p for p in leaves if p[0] in ("params", "rest", "opt_state")]
    assert arrays and all(any(k.startswith("lora_") for k in p) for p in arrays
                          if p[0] != "opt_state" or "mu" in p or "nu" in p), arrays
    assert not [p for p in arrays if "kernel" in p or "embedding" in p or "scale" in p]

    # both exports give the logits of the trained model (merged: transformers; adapter: peft
    # on the base, which is the seed's random init rebuilt and saved here)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        want = merged(input_ids=torch.tensor(IDS)).logits.numpy()
    assert (tmp_path / "export_adapter" / "adapter_model.safetensors").exists()
    import peft  # a test dependency (setup.cfg [test])

    from prefjax.models.hf import save_hf
    from prefjax.train import build

    tok = build.load_tokenizer(c)
    save_hf(build.materialize(build.decoder_fn(c, tok), c.seed), tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor(IDS)).logits.numpy()
        got = peft.PeftModel.from_pretrained(base, tmp_path / "export_adapter")(
            input_ids=torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want - base_logits).max() > 1e-4  # the adapters did change the model


def _paths(tree) -> list[tuple]:
    import jax

    return [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_lora_resume_restores_adapters_and_optimizer_exactly(tmp_path, monkeypatch):
    """2 steps, then the same workdir extended to 4, logs what 4 uninterrupted steps log (the
    frozen base is rebuilt from its source, the adapters and their moments restored)."""
    no_second_model(monkeypatch)

    def cfg(steps):
        return lora_smoke(train__num_steps=steps, train__log_every=1, train__save_every=2,
                          train__eval_every=2, train__export_hf=False)

    run(cfg(4), str(tmp_path / "full"))
    run(cfg(2), str(tmp_path / "split"))
    run(cfg(4), str(tmp_path / "split"))
    full, split = (read_metrics(tmp_path / d) for d in ("full", "split"))
    assert [r["step"] for r in split] == [r["step"] for r in full] == [1, 2, 3, 4]
    for a, b in zip(full, split):
        for k in a:
            if not k.startswith("perf/"):
                np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_lora_live_reference_refuses_another_reference_model(tmp_path):
    c = lora_smoke(reference__source=str(tmp_path / "elsewhere"), train__export_hf=False)
    with pytest.raises(ValueError, match="reference.source"):
        run(c, str(tmp_path / "w"))


def test_ppo_lora_rollouts_score_the_reference_with_the_base(tmp_path, monkeypatch):
    """Online: the rollout's reference log-probs come from the state's own base (adapters
    off), so the first rollout (B = 0) has KL exactly 0; the value head trains in full."""
    no_second_model(monkeypatch)
    c = load_config(ROOT / "configs" / "ppo_synthetic.py", "smoke")
    c.lora.rank = 4
    c.train.num_steps, c.train.eval_every, c.train.export_hf = 2, 2, False
    c.train.log_every = 1
    run(c, str(tmp_path))
    first = read_metrics(tmp_path)[0]
    kl = [v for k, v in first.items() if k.endswith("objective/kl")]
    assert kl and abs(kl[0]) < 1e-6, first
    assert np.isfinite(first["loss"]) and first["grad_norm"] > 0


def test_lora_base_reference_equals_precomputed_reference_logps(tmp_path):
    """The live reference of a LoRA run (its base, adapters off, every step) gives the metrics
    of reference log-probs precomputed once from the initial policy before training."""
    out = {}
    for mode in ("precomputed", "live"):
        c = lora_smoke(reference__mode=mode, train__num_steps=4, train__log_every=1,
                       train__export_hf=False)
        run(c, str(tmp_path / mode))
        out[mode] = [{k: v for k, v in r.items() if not k.startswith("perf/")}
                     for r in read_metrics(tmp_path / mode)]
    assert len(out["live"]) == 4
    assert_same_training(out["precomputed"], out["live"])
