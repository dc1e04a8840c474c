"""Token-level credit assignment on the synthetic task: do per-token implicit rewards locate errors?

In DPO's token-level MDP view ("From r to Q*", Rafailov et al. 2024) every response token gets the
implicit reward r_t = beta * (log pi(y_t | s_t) - log pi_ref(y_t | s_t)) (`prefjax.credit`). On the
synthetic task every response has a known per-token error label (`prefjax.data.synthetic
.token_errors` / `first_error`: where it departs from t(x) + <eos>, consistently with r*). This
script trains DPO, IPO and MPO from one SFT policy (the frozen reference; the configs' defaults
otherwise, through `experiments/frontier.py`'s job machinery) and measures, on held-out
Bradley-Terry pairs no run trains on:

  * rejected / first_error: the fraction of rejected responses with an error whose most negative
    token reward lies on (tolerance 0) or within one token of (tolerance 1) their first error;
  * rejected / any_error: the same, counting a hit within the tolerance of any error position;
  * chosen / first_fix: the fraction of chosen responses whose most positive token reward lies at
    (or within one token of) the first position where the chosen response is right and the
    rejected one wrong (pairs that have such a position);
  * chosen / first_error: the chosen responses' most positive reward against their own first
    error (the literal mirror of the rejected measurement; there is no reason to expect a hit).

The same measurements with the SFT policy's own token log-probs in place of the rewards (its least
likely token as the "most negative", its most likely as the "most positive"; algo `sft_logp`) give
a heuristic that needs no preference training. Each fraction comes with its uniform baseline:
the expected hit rate of a position drawn uniformly from the response's tokens (its <eos>
included) with the same tolerance, averaged over the same responses. beta scales all token
rewards of a run alike (beta > 0), so the positions of the extremes, and every figure here, do
not depend on it; rewards are computed with beta = 1.

Usage: python experiments/token_credit.py [--out DIR] [--small] [--seed S] [--workers N]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from experiments import frontier  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "token_credit"
EVAL_SEED = 777_019  # held-out pairs: a seed no config trains on


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one run of the experiment (everything else is the config files' defaults)."""

    sft_steps: int = 400
    steps: int = 200  # each preference run (the configs' default)
    num_train: int = 0  # training pairs per preference run; 0: the config's (4096)
    eval_pairs: int = 1024
    # (algo, strength): the configs' defaults (DPO beta, IPO tau, MPO alpha with pair-KL beta 0.1)
    runs: tuple = (("dpo", 0.1), ("ipo", 0.1), ("mpo", 0.1))
    seed: int = 0


SETTINGS = {
    "default": Setting(),
    "small": Setting(sft_steps=150, steps=30, num_train=1024, eval_pairs=256),
}


def jobs_of(setting: Setting, out: pathlib.Path) -> tuple[frontier.Job, list[frontier.Job]]:
    """(SFT job, preference jobs) trained by `frontier.train_all` under `out/runs`."""
    sft_dir = out / "runs" / "sft"
    n = setting.sft_steps
    sft = frontier.Job("sft", "", 0.0, "sft_synthetic", "", (
        ("seed", setting.seed), ("train.num_steps", n), ("train.eval_every", n),
        ("train.save_every", n)), str(sft_dir))
    jobs = []
    for name, s in setting.runs:
        a = frontier.ALGOS[name]
        if a.online:
            raise ValueError(f"{name}: token_credit trains offline algorithms only")
        arg = ",".join(filter(None, (a.fixed, f"{a.arg}={s:g}", f"init_from={sft_dir}")))
        k = setting.steps
        over = [("seed", setting.seed), ("train.num_steps", k), ("train.eval_every", k),
                ("train.save_every", k), ("train.export_hf", True)]
        if setting.num_train:
            over.append(("data.num_train", setting.num_train))
        if name == "mpo":  # mpo.samples_per_batch (16) a step: each reference sample used once
            over.append(("mpo.num_ref_samples", k * 16))
        jobs.append(frontier.Job(name, a.knob, float(s), a.config, arg, tuple(over),
                                 str(out / "runs" / f"{name}_{a.knob}{s:g}")))
    return sft, jobs


def held_out_batches(n: int, seed: int = EVAL_SEED, batch_size: int = 256) -> list[dict]:
    """`collate_pairs` batches of `n` held-out Bradley-Terry pairs ([:b] chosen, [b:] rejected)."""
    from prefjax.data import collate_pairs, tokenize_dataset
    from prefjax.data import synthetic as syn

    pairs, _ = tokenize_dataset(syn.make_preference_dataset(n, seed), syn.make_tokenizer())
    rows = list(pairs)
    seq_len = syn.MAX_PROMPT_TOKENS + syn.MAX_RESPONSE_TOKENS + 1
    return [collate_pairs(rows[i:i + batch_size], pad_id=syn.PAD_ID, seq_len=seq_len)
            for i in range(0, len(rows), batch_size)]


def window_hits(pos: int, anchors: np.ndarray, n: int, tol: int) -> tuple[bool, float]:
    """(whether `pos` lies within `tol` of any anchor, the chance of that for a position drawn
    uniformly from 0..n-1): the measurement and its uniform baseline for one response."""
    near = np.zeros(n, bool)
    for a in anchors:
        near[max(a - tol, 0):min(a + tol + 1, n)] = True
    return bool(near[pos]), float(near.mean())


def responses(batch: dict, rewards: np.ndarray) -> list[dict]:
    """Per pair of a batch: each side's prompt, response ids, token rewards and error labels."""
    from prefjax.credit import response_slices
    from prefjax.data import synthetic as syn

    ids = np.asarray(batch["input_ids"])
    sl = response_slices(batch["loss_mask"])
    b = len(ids) // 2
    out = []
    for i in range(b):
        pair = {}
        for side, row in (("chosen", i), ("rejected", b + i)):
            s = sl[row]
            p, y = ids[row, :s.start], ids[row, s]
            pair[side] = {"r": rewards[row, s], "err": syn.token_errors(p, y),
                          "first": syn.first_error(p, y)}
        out.append(pair)
    return out


MEASURES = (("rejected", "first_error"), ("rejected", "any_error"), ("chosen", "first_fix"),
            ("chosen", "first_error"))


def localisation(pairs: list[dict], tol: int) -> dict[tuple[str, str], dict]:
    """{(side, anchor): {n, hits, fraction, baseline}} over held-out pairs (see the docstring)."""
    acc = {m: ([], []) for m in MEASURES}
    for pair in pairs:
        c, r = pair["chosen"], pair["rejected"]
        if r["first"] >= 0:
            pos = int(np.argmin(r["r"]))
            for anchor, where in (("first_error", [r["first"]]),
                                  ("any_error", np.flatnonzero(r["err"]))):
                hit, base = window_hits(pos, np.asarray(where), len(r["r"]), tol)
                acc["rejected", anchor][0].append(hit)
                acc["rejected", anchor][1].append(base)
        pos = int(np.argmax(c["r"]))
        if c["first"] >= 0:
            hit, base = window_hits(pos, np.array([c["first"]]), len(c["r"]), tol)
            acc["chosen", "first_error"][0].append(hit)
            acc["chosen", "first_error"][1].append(base)
        m = min(len(c["err"]), len(r["err"]))
        fix = np.flatnonzero(r["err"][:m] & ~c["err"][:m])
        if len(fix):
            hit, base = window_hits(pos, fix[:1], len(c["r"]), tol)
            acc["chosen", "first_fix"][0].append(hit)
            acc["chosen", "first_fix"][1].append(base)
    return {k: {"n": len(h), "hits": int(np.sum(h)), "fraction": float(np.mean(h)) if h else
                float("nan"), "baseline": float(np.mean(bl)) if bl else float("nan")}
            for k, (h, bl) in acc.items()}


def measure(job: frontier.Job, batches: list[dict]) -> tuple[list[dict], float]:
    """(per-pair records, held-out pair accuracy of the summed token rewards) of a trained job;
    its policy is the run's export, its reference the run's reference (the SFT policy)."""
    from prefjax.credit import load_run, token_rewards

    policy, reference, _ = load_run(job.workdir)
    pairs, wins = [], []
    for batch in batches:
        r = np.asarray(token_rewards(policy, reference, batch, beta=1.0))
        seq = r.sum(1)
        b = len(seq) // 2
        m = seq[:b] - seq[b:]
        wins.append(np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0)))
        pairs += responses(batch, r)
    return pairs, float(np.concatenate(wins).mean())


def measure_reference(sft: frontier.Job, batches: list[dict]) -> list[dict]:
    """Per-pair records scored by the SFT policy's own token log-probs log pi_ref(y_t | s_t)
    instead of a reward: a heuristic without preference training (its least likely token
    standing for the most negative reward, its most likely for the most positive)."""
    import jax.numpy as jnp

    from prefjax.lm import token_logps
    from prefjax.models.hf import load_hf
    from prefjax.train.build import export_dir

    ref, _ = load_hf(export_dir(sft.workdir), tokenizer=False)
    pairs = []
    for batch in batches:
        lp = np.asarray(token_logps(ref, jnp.asarray(batch["input_ids"]),
                                    jnp.asarray(batch["attention_mask"])))
        pairs += responses(batch, lp)
    return pairs


FIELDS = ("algo", "knob", "strength", "side", "anchor", "tolerance", "n", "hits", "fraction",
          "baseline", "lift", "stderr", "pair_accuracy")


def rows_of(job: frontier.Job, pairs: list[dict], accuracy: float) -> list[dict]:
    rows = []
    for tol in (1, 0):
        for (side, anchor), v in localisation(pairs, tol).items():
            f, n = v["fraction"], v["n"]
            rows.append({"algo": job.name, "knob": job.knob, "strength": job.strength,
                         "side": side, "anchor": anchor, "tolerance": tol, **v,
                         "lift": f - v["baseline"],
                         "stderr": float(np.sqrt(f * (1 - f) / n)) if n else float("nan"),
                         "pair_accuracy": accuracy})
    return rows


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "strength": f"{r['strength']:g}",
                        **{k: f"{r[k]:.4f}" for k in ("fraction", "baseline", "lift", "stderr",
                                                      "pair_accuracy")}})


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path) as fh:
        return [{**r, "strength": float(r["strength"]), "tolerance": int(r["tolerance"]),
                 "n": int(r["n"]), "hits": int(r["hits"]),
                 **{k: float(r[k]) for k in ("fraction", "baseline", "lift", "stderr",
                                             "pair_accuracy")}}
                for r in csv.DictReader(fh)]


def label_of(r: dict) -> str:
    if r["knob"] == "heuristic":
        return "SFT log-prob (no preference training)"
    return f"{r['algo']} {r['knob']}={r['strength']:g}"


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Per tolerance, a panel: measured fraction (bars, +-1 standard error) and the uniform
    baseline (black ticks) for each measurement and algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(dict.fromkeys(r["algo"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    width = 0.8 / max(len(algos), 1)
    for ax, tol in zip(axes, (1, 0)):
        for j, algo in enumerate(algos):
            for i, m in enumerate(MEASURES):
                r = next(r for r in rows if r["algo"] == algo and (r["side"], r["anchor"]) == m
                         and r["tolerance"] == tol)
                x = i + (j - (len(algos) - 1) / 2) * width
                ax.bar(x, r["fraction"], width * 0.9, yerr=r["stderr"], capsize=2,
                       color=frontier.COLORS.get(algo, "0.6"), alpha=0.8,
                       label=(label_of(r) if i == 0 else None))
                ax.plot([x - width * 0.45, x + width * 0.45], [r["baseline"]] * 2, "k-", lw=2,
                        label="uniform baseline" if i == 0 and j == 0 else None)
        ax.set_xticks(range(len(MEASURES)))
        ax.set_xticklabels([
            "rejected: min r_t\non its first error", "rejected: min r_t\non any error",
            "chosen: max r_t on first\nfix of the rejected's errors",
            "chosen: max r_t\non its own first error"], fontsize=8)
        ax.set_title(f"within {tol} token{'s' if tol != 1 else ''} of the anchor"
                     if tol else "exactly on the anchor", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fraction of held-out responses")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = [f"{'algo':<6}{'strength':>9}  {'measurement':<22}{'tol':>4}{'n':>6}{'fraction':>10}"
             f"{'uniform':>9}{'lift':>8}{'pair acc':>10}"]
    for r in rows:
        lines.append(f"{r['algo']:<6}{r['strength']:>9g}  {r['side'] + '/' + r['anchor']:<22}"
                     f"{r['tolerance']:>4}{r['n']:>6}{r['fraction']:>10.3f}{r['baseline']:>9.3f}"
                     f"{r['lift']:>+8.3f}{r['pair_accuracy']:>10.3f}")
    return "\n".join(lines)


def run(setting: Setting = SETTINGS["default"], out: pathlib.Path = DEFAULT_OUT, *,
        workers: int = 2) -> dict:
    """Train (or reuse) the SFT and preference runs under `out/runs`, measure, write
    `token_credit.csv` and `token_credit.png` to `out`; returns {"rows": ..., "seconds": ...}."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sft, jobs = jobs_of(setting, out)
    t0 = time.perf_counter()
    seconds = frontier.train_all([sft], workers=workers)
    seconds.update(frontier.train_all(jobs, workers=workers))
    batches = held_out_batches(setting.eval_pairs)
    rows = []
    for job in jobs:
        pairs, accuracy = measure(job, batches)
        rows += rows_of(job, pairs, accuracy)
    heuristic = dataclasses.replace(sft, name="sft_logp", knob="heuristic")
    rows += rows_of(heuristic, measure_reference(sft, batches), float("nan"))
    write_csv(rows, out / "token_credit.csv")
    plot(rows, out / "token_credit.png",
         f"where the token-level implicit reward peaks ({setting.eval_pairs} held-out pairs; "
         f"{setting.steps}-step runs from a {setting.sft_steps}-step SFT policy, seed "
         f"{setting.seed})")
    total = time.perf_counter() - t0
    timing = out / "timing.json"  # training seconds of each run, kept across cached re-runs
    old = json.loads(timing.read_text()).get("runs", {}) if timing.exists() else {}
    runs = {**old, **{str(pathlib.Path(k).relative_to(out)): round(v, 1)
                      for k, v in seconds.items()}}
    timing.write_text(json.dumps({"runs": runs, "last_invocation_seconds": round(total, 1)},
                                 indent=1))
    return {"rows": rows, "seconds": seconds, "total_seconds": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--small", action="store_true", help="seconds-per-run smoke setting")
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once (processes)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (SFT included)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    setting = dataclasses.replace(SETTINGS["small" if args.small else "default"], seed=args.seed)
    res = run(setting, args.out, workers=args.workers)
    print(table(res["rows"]))
    print(f"wrote {args.out} in {res['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
