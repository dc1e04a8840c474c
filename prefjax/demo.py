"""`make demo`: SFT then DPO on the embedded synthetic task, with before / after numbers.

    python -m prefjax.demo --workdir=workdirs/demo [--smoke]

1. SFT a tiny Llama on the task's reference-policy data (configs/sft_synthetic.py).
2. DPO from the SFT policy on Bradley-Terry-labelled pairs (configs/dpo_synthetic.py); the SFT
   policy is the frozen reference.
3. Compare the SFT policy (before) and the DPO policy (after) on held-out data: preference
   accuracy on held-out pairs, and the ground-truth reward r* and KL(pi || ref) of responses
   sampled on held-out prompts. Writes `summary.json` in the workdir. Re-running resumes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import time
from pathlib import Path

import jax

from prefjax.config import lock
from prefjax.data import BatchLoader, collate_pairs, collate_prompts, tokenize_dataset
from prefjax.data import synthetic as syn
from prefjax.eval import pair_metrics, sample_metrics
from prefjax.models.hf import load_hf
from prefjax.train import offline
from prefjax.train.build import export_dir

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EVAL_SEED = 777_000  # prompts and pairs no run trains on


def load_config(name: str, arg: str | None = None):
    """`configs/<name>.py`'s `get_config(arg)`, locked."""
    path = CONFIGS / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; the demo runs from a source checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lock(mod.get_config(arg))


def compare(before: str, after: str, *, num_eval: int = 512, seed: int = 0) -> dict:
    """Held-out metrics of the exported policies `before` (also the reference) and `after`."""
    tok = syn.make_tokenizer()
    ref, _ = load_hf(before, tokenizer=False)
    pol, _ = load_hf(after, tokenizer=False)
    pairs, _ = tokenize_dataset(syn.make_preference_dataset(num_eval, EVAL_SEED), tok)
    prompts, _ = tokenize_dataset(syn.make_prompt_dataset(num_eval, EVAL_SEED + 1), tok)
    bs = 64

    def pair_batches():
        return BatchLoader(pairs, batch_size=bs, seed=0, num_epochs=1, collate=functools.partial(
            collate_pairs, pad_id=syn.PAD_ID, seq_len=64))

    def prompt_batches():
        return BatchLoader(prompts, batch_size=bs, seed=0, num_epochs=1,
                           collate=functools.partial(collate_prompts, pad_id=syn.PAD_ID,
                                                     seq_len=16))

    sample_kw = dict(key=jax.random.key(seed), reward_fn=syn.reward_of_samples, max_new_tokens=8,
                     eos_id=syn.EOS_ID, pad_id=syn.PAD_ID)
    out = {}
    for name, model in (("before", ref), ("after", pol)):
        out[name] = {
            "implicit_reward_accuracy": pair_metrics(model, ref, pair_batches())["pair_accuracy"],
            "loglik_accuracy": pair_metrics(model, None, pair_batches())["pair_accuracy"],
            **{f"sampled_{k}": v for k, v in
               sample_metrics(model, ref, prompt_batches(), **sample_kw).items()},
            "greedy_reward": sample_metrics(model, None, prompt_batches(), greedy=True,
                                            **sample_kw)["reward"],
        }
    return out


ROWS = (
    ("implicit_reward_accuracy", "held-out reward accuracy, log pi/pi_ref (ties 1/2)"),
    ("loglik_accuracy", "held-out pairs ranked by log-likelihood"),
    ("sampled_reward", "ground-truth reward r* of samples (T=1)"),
    ("greedy_reward", "ground-truth reward r* of greedy responses"),
    ("sampled_kl", "KL(pi || ref) of samples (nats)"),
    ("sampled_length", "response length (tokens, incl. EOS)"),
)


def report(summary: dict) -> str:
    lines = [f"{'metric':<54}{'SFT (before)':>14}{'DPO (after)':>14}"]
    for key, label in ROWS:
        lines.append(f"{label:<54}{summary['before'][key]:>14.3f}{summary['after'][key]:>14.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="workdirs/demo")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run (checks the wiring)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    work = Path(args.workdir)
    arg = "smoke" if args.smoke else None
    t0 = time.time()
    sft = load_config("sft_synthetic", arg)
    print(f"[1/3] SFT on the synthetic task ({sft.train.num_steps} steps) -> {work / 'sft'}")
    offline.train(sft, str(work / "sft"))
    dpo = load_config("dpo_synthetic", f"init_from={work / 'sft'}" + (",smoke" if arg else ""))
    dpo.model.init_from = str(work / "sft")  # smoke would otherwise start from a random init
    print(f"[2/3] DPO from the SFT policy ({dpo.train.num_steps} steps, beta "
          f"{dpo.loss.beta}) -> {work / 'dpo'}")
    offline.train(dpo, str(work / "dpo"))
    print("[3/3] held-out evaluation of the SFT policy (= reference) and the DPO policy")
    summary = compare(str(export_dir(work / "sft")), str(export_dir(work / "dpo")),
                      num_eval=64 if args.smoke else 512)
    summary["seconds"] = time.time() - t0
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(report(summary))
    print(f"done in {summary['seconds']:.0f} s; summary in {work / 'summary.json'}, "
          f"metrics in {work / 'sft' / 'metrics.jsonl'} and {work / 'dpo' / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
