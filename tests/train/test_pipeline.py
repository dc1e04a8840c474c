"""The one pipeline: modules import alone, no algorithm names outside the records, resumed
workdirs take schedule-only changes, live references reach sampling, evaluation compiles once."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from prefjax.losses import records
from prefjax.main import run
from prefjax.metrics import read_metrics
from tests.train.test_offline import ROOT, load_config

PIPELINE = sorted(f"prefjax.pipeline.{p.stem}" for p in (ROOT / "prefjax" / "pipeline").glob(
    "*.py") if p.stem != "__init__")
ENTRY = ["prefjax.train.offline", "prefjax.train.online", "prefjax.main", "prefjax.eval",
         "prefjax.losses.records", "prefjax.pipeline"]


FRESH = """
import importlib, sys
for m in sys.argv[1:]:
    for k in [k for k in sys.modules if k == "prefjax" or k.startswith("prefjax.")]:
        del sys.modules[k]
    importlib.import_module(m)
"""


def test_every_pipeline_module_imports_alone_in_a_fresh_interpreter():
    """No import cycle: each module imports first, with no prefjax module loaded before it (one
    interpreter; prefjax is dropped from sys.modules between modules, third-party libraries
    stay loaded so the check costs one start-up)."""
    p = subprocess.run([sys.executable, "-c", FRESH, *ENTRY, *PIPELINE], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(PIPELINE) >= 8


# prefjax files that may name algorithms besides prefjax/losses/ and the base config: the demo
# script runs two configs by name; build.load_data keeps the old name of the sequences kind
ALLOWED = {"prefjax/demo.py": None, "prefjax/config.py": None,
           "prefjax/train/build.py": "sequences", "prefjax/data/synthetic.py": "source="}


def test_no_algorithm_name_outside_losses_records_and_configs():
    names = sorted({*records.names(), *(r.loss for r in records.RECORDS.values())})
    word = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    hits = []
    for path in sorted((ROOT / "prefjax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("prefjax/losses/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if word.search(line):
                allowed = ALLOWED.get(rel, "\0")
                if allowed is None or allowed in line:
                    continue
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_records_cover_every_registered_loss_and_say_what_the_pipeline_needs():
    from prefjax import losses

    assert {r.loss for r in records.RECORDS.values()} == set(losses.names())
    dpo, mpo = records.get("dpo"), records.get("mpo")
    assert dpo.needs_reference({"reference_free": False})
    assert not dpo.needs_reference({"reference_free": True})
    assert mpo.tail_key({"alpha": 0.1}) == "ref_sample_mask" and mpo.tail_key({"alpha": 0}) is None
    assert not mpo.needs_reference({"beta": 0.1, "p_ref_uniform": True})
    assert records.get("online_dpo").paired and not records.get("ppo").paired
    with pytest.raises(ValueError, match="unknown algo 'nope'"):
        records.get("nope")


def test_deprecated_names_warn_loudly():
    from prefjax.train import offline, online

    with pytest.warns(DeprecationWarning, match="records"):
        assert offline.needs_reference("dpo", {})
    with pytest.warns(DeprecationWarning):
        assert online.LOSS_OF["online_dpo"] == "dpo"
    with pytest.warns(DeprecationWarning):
        assert "p3o" in online.PAIRED


def smoke(name: str, **over):
    c = load_config(ROOT / "configs" / f"{name}.py", "smoke")
    c.train.export_hf = False
    for key, value in over.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def test_resume_accepts_schedule_changes_and_refuses_math_changes(tmp_path):
    c = smoke("dpo_synthetic", train__num_steps=4, train__save_every=2, train__eval_every=4)
    run(c, str(tmp_path))
    assert read_metrics(tmp_path)[-1]["step"] == 4
    longer = smoke("dpo_synthetic", train__num_steps=6, train__save_every=2,
                   train__eval_every=3, train__log_every=1)
    run(longer, str(tmp_path))  # extends the finished run
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs][-2:] == [5, 6] and "eval/loss" in recs[-1]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 6
    other = smoke("dpo_synthetic", train__num_steps=6, train__save_every=2, train__eval_every=3,
                  train__log_every=1, train__lr=0.0123)
    with pytest.raises(ValueError, match=r"train\.lr: .* -> 0\.0123"):
        run(other, str(tmp_path))
    cosine = smoke("dpo_synthetic", train__schedule="cosine", train__num_steps=4)
    run(cosine, str(tmp_path / "cos"))
    with pytest.raises(ValueError, match=r"\['train\.num_steps'\]"):
        run(smoke("dpo_synthetic", train__schedule="cosine", train__num_steps=6),
            str(tmp_path / "cos"))


def test_live_reference_with_generated_reference_samples_and_sampled_eval(tmp_path):
    """reference.mode=live used to hand the WithReference wrapper to the sampler."""
    from prefjax import eval as ev

    c = smoke("mpo_synthetic", reference__mode="live", train__num_steps=4, train__eval_every=2)
    c.mpo.num_ref_samples = 16
    c.eval.sample = True
    c.eval.num_prompts = 16
    ev._logps.clear_cache()  # an earlier test in this process may have compiled these shapes
    before = sum(ev.TRACES.values())
    out = run(c, str(tmp_path))
    assert (tmp_path / "ref_samples" / "dataset_info.json").exists()
    assert np.isfinite(out["sample/reward"]) and np.isfinite(out["sample/kl"])
    # two evaluations (steps 2, 4) of 2 prompt batches each: the policy and the reference
    # (same structure, same shapes) share one compiled log-prob function
    assert sum(ev.TRACES.values()) - before == 1


def test_sampled_eval_scores_the_samplers_true_rows_when_pad_is_eos():
    """pad = EOS (a tokenizer without pad) and a chat prompt using EOS as a turn separator: the
    scorer must see the prompt as collated (mask 1 on its EOS), not rebuilt from ids != pad."""
    import jax
    from flax import nnx

    from prefjax.data import collate_prompts
    from prefjax.eval import sample_metrics
    from prefjax.models.llama import Llama, LlamaConfig
    from prefjax.pipeline.rewards import eval_reward_fn

    eos = pad = 2
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=32)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    prompts = [[5, eos, 7, 9], [4, 6]]  # row 0: "turn 1 <eos> turn 2"
    batch = collate_prompts([{"prompt_ids": p} for p in prompts], pad_id=pad, seq_len=6)
    seen = []

    def scorer(prompt_ids, tokens, rows):
        seen.append(jax.device_get(rows))
        return rows["attention_mask"].sum(1).astype("float32")  # real tokens of each row

    kw = dict(key=jax.random.key(3), max_new_tokens=3, eos_id=eos, pad_id=pad)
    out = sample_metrics(model, None, [batch], scorer=scorer, **kw)
    rows = seen[0]
    lengths = rows["loss_mask"].sum(1)
    np.testing.assert_array_equal(rows["input_ids"][0, :4], prompts[0])
    np.testing.assert_array_equal(rows["attention_mask"].sum(1), [4, 2] + lengths)
    assert out["reward"] == pytest.approx(np.mean([4, 2] + lengths))

    # the two-argument form rebuilds the prompt mask from ids != pad and drops that EOS
    class Tok:
        pad_token_id, eos_token_id = pad, eos

    c = load_config(ROOT / "configs" / "dpo_synthetic.py", "smoke")
    legacy = eval_reward_fn(c, Tok(), lambda p, t, r: r["attention_mask"].sum(1))
    old = sample_metrics(model, None, [batch], reward_fn=legacy, **kw)
    assert old["reward"] < out["reward"]


def test_eval_reward_rows_end_at_any_eos_id_of_the_model_folder(tmp_path):
    """The two-argument reward form cuts each response at the first of the folder's EOS ids
    (generation_config.json lists two, as Llama-3-Instruct does), not the tokenizer's alone."""
    import json

    import jax.numpy as jnp

    from prefjax.pipeline.rewards import eval_reward_fn

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))

    class Tok:
        pad_token_id, eos_token_id = 0, 2

    c = load_config(ROOT / "configs" / "dpo_synthetic.py", "smoke")
    c.model.init_from = str(tmp_path)
    seen = []

    def scorer(p, t, rows):
        seen.append(np.asarray(rows["loss_mask"]))
        return rows["loss_mask"].sum(1).astype(jnp.float32)

    prompts = jnp.array([[5, 6], [7, 8]])
    tokens = jnp.array([[9, 3, 9, 2, 9], [9, 9, 2, 3, 9]])  # row 0 ends at 3, row 1 at 2
    got = eval_reward_fn(c, Tok(), scorer)(prompts, tokens)
    np.testing.assert_array_equal(np.asarray(got), [2, 3])  # the EOS itself is scored


def test_live_bf16_reference_resumes_like_an_uninterrupted_run(tmp_path):
    """A live reference (kept in bf16, rebuilt from its source on resume, not checkpointed):
    2 steps, then the same workdir extended to 4, logs what 4 uninterrupted steps log."""
    def cfg(steps):
        return smoke("dpo_synthetic", reference__mode="live", reference__param_dtype="bfloat16",
                     train__num_steps=steps, train__log_every=1, train__save_every=2,
                     train__eval_every=2)

    run(cfg(4), str(tmp_path / "full"))
    run(cfg(2), str(tmp_path / "split"))
    run(cfg(4), str(tmp_path / "split"))
    full, split = (read_metrics(tmp_path / d) for d in ("full", "split"))
    assert [r["step"] for r in split] == [r["step"] for r in full] == [1, 2, 3, 4]
    for a, b in zip(full, split):
        for k in a:
            if not k.startswith("perf/"):
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_readme_snippet_using_the_pieces_runs():
    """README's "Using the pieces from your own code", executed with a pairwise batch."""
    from tests.train.tiny_model import pair_batch

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using the pieces from your own code"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    batch = pair_batch(8, t=6)  # 8 pairs (16 rows): grad_accum=4 splits them 4 ways
    batch = {**batch, "ref_logps": np.zeros(16, np.float32)}
    scope = {"batch": {k: v for k, v in batch.items()
                       if k in ("input_ids", "attention_mask", "loss_mask", "ref_logps")}}
    exec(code, scope)
    assert np.isfinite(float(scope["metrics"]["loss"])) and int(scope["state"].step) == 1
