"""KL-reward frontiers on the synthetic task (as in the P3O paper), and MPO vs DPO under
deterministic preferences.

Stage 0 trains the SFT policy (configs/sft_synthetic.py, 400 steps): the initial policy and the
frozen reference of every later run. Each run is a config file's own experiment,
`configs/<algo>_synthetic.py:<knob>=<s>,init_from=<SFT run>` (its learning rate, batch size and
other defaults unchanged), trained by `prefjax.main.run` in `<out>/runs/<group>/<run>`; a finished
run is reused (a workdir holding another config fails loudly), up to `--workers` runs at a time.

Frontier (Bradley-Terry labels): DPO beta, IPO tau, MPO alpha (its off-policy KL weight, pair KL
beta 0.1), P3O V1 and V2 `loss.kl_coef`, PPO `online.kl_coef`, online DPO beta, GRPO and Dr. GRPO
`loss.beta` (k3 KL in the loss; 0 = none, TRL's default) and RLOO `online.kl_coef` (in the reward),
three strengths each; offline runs 60 steps, online runs 20 rollouts. Every 10 (offline) / 3
(online) steps the trainers log the ground-truth reward r* and KL(pi || ref) (k1 estimate) of
temperature-1 samples on 128 held-out prompts (`eval.sample=True` offline). Deterministic
preferences (`labeling=argmax`): DPO at beta 0.1 and 0.5, MPO at alpha 0 and 1 (beta 0.1), 60
steps, the same evaluation.

Two measurement details. The trainers evaluate from step `eval_every` on; the step-0 point is the
SFT policy evaluated here with the trainer's own prompts, batches and sampling key (KL 0; checked
equal to the trainer's evaluation after one step at lr 1e-9). Offline runs evaluate on the held-out
pairs' prompts, online runs on a held-out prompt set, and PPO's batches of 64 draw other sampling
keys than P3O's 32, so one SFT policy scores 0.346 / 0.351 / 0.385 (seed 0): raw rewards are not
comparable across those groups. The figure therefore plots the gain, r* minus the SFT policy's r* on
the same prompts and keys; the CSVs hold both (`algo, knob, strength, step, kl, reward, gain`).
The k1 KL estimate is noisy near the reference and can dip below 0 (down to -0.03 here).

Measured (default setting, seed 0; `--seed 1` in results/frontier/seed1; one run each, so gains
of about 0.02 are within noise):
  * Online methods improve r* steadily at small KL: after 20 rollouts P3O V1 +0.044..+0.071 at
    KL 0.15-0.21, P3O V2 +0.022..+0.062 at 0.10-0.14, PPO +0.038..+0.053 at 0.03-0.16, online
    DPO +0.043..+0.055 at 0.14-0.33 (seed 1: all four +0.032..+0.038 at KL 0.19-0.25).
    GRPO, Dr. GRPO and RLOO (`--algos grpo,dr_grpo,rloo`, results/frontier_group): +0.022..+0.031
    at KL 0.08-0.14, indistinguishable from each other at this scale.
  * Offline DPO (lr 1e-3 from its config) is erratic: its best gain, +0.082, costs KL 1.9, and
    beta 0.1 ends at KL 6.5 and -0.091; in seed 1 no DPO evaluation beats the SFT policy (beta 0.3
    ends at KL 9.4, -0.53). IPO: best +0.063 at KL 1.6 (tau 0.3), tau 3 stays below KL 0.3
    (gain <= +0.022). MPO: best +0.041 at KL 0.46, final gains -0.014..+0.011.
  * So the P3O paper's headline, online pairwise RL (and PPO) dominating DPO on the KL-reward
    frontier, reproduces in both seeds. Its finer claim, P3O above PPO, does not resolve at this
    scale: P3O V1 leads PPO by 0.018 in seed 0 and ties in seed 1; V1 and V2 do not differ
    consistently.
  * Deterministic preferences: MPO with alpha = 1 keeps KL(pi || ref) at 0.09-0.26 over training
    (final 0.09; seed 1: 0.12-0.22), the lowest of the four runs in both seeds; with alpha = 0 it
    drifts to 0.9-6.9 (final 1.9; seed 1 final 0.50, so 2.7x alpha = 1's). DPO drifts fast at
    both betas in seed 0 (final 3.4 and 3.1, peaks 6.5 and 4.8), but in seed 1 only at beta 0.1
    (final 2.7) while beta 0.5 ends at 0.40: "DPO drifts regardless of beta" holds in one seed
    of two. Nor does DPO's KL grow steadily: in seed 0 it jumps within 10-20 steps, then
    fluctuates; in seed 1 (beta 0.1) it goes 0.4, 0.9, 0.8, 1.2, 3.9, 2.7. Staying close has
    a price: MPO alpha = 1 ends +0.013 / +0.018 (seeds 0 / 1) above the SFT policy, DPO
    +0.084 / +0.079 (beta 0.1 / 0.5) in seed 0 and +0.007 / +0.036 in seed 1.

Usage: python experiments/frontier.py --out DIR [--small | --full] [--workers N] [--seed S]
       [--only frontier|deterministic] [--algos grpo,dr_grpo,rloo,...]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import functools
import json
import logging
import multiprocessing
import pathlib
import sys
import time

import numpy as np

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "frontier"


@dataclasses.dataclass(frozen=True)
class Algo:
    """One line of the sweep: `configs/<config>.py:<fixed>,<knob_arg>=<s>` for each strength s."""

    config: str  # configs/<config>.py
    knob: str  # what the strength is (label in the CSV and legend)
    arg: str  # the config argument the strength sets
    fixed: str = ""  # further config arguments
    online: bool = False


ALGOS = {
    "dpo": Algo("dpo_synthetic", "beta", "beta"),
    "ipo": Algo("ipo_synthetic", "tau", "tau"),
    "mpo": Algo("mpo_synthetic", "alpha", "alpha"),  # pair-KL weight beta stays at 0.1
    "p3o_v1": Algo("p3o_synthetic", "kl_coef", "kl", "variant=v1", online=True),
    "p3o_v2": Algo("p3o_synthetic", "kl_coef", "kl", "variant=v2", online=True),
    "ppo": Algo("ppo_synthetic", "kl_coef", "kl", online=True),
    "online_dpo": Algo("online_dpo_synthetic", "beta", "beta", online=True),
    # group methods, k = 4 samples per prompt (16 prompts: 64 samples a rollout, as PPO)
    "grpo": Algo("grpo_synthetic", "beta", "beta", "variant=grpo", online=True),
    "dr_grpo": Algo("grpo_synthetic", "beta", "beta", "variant=dr_grpo", online=True),
    "rloo": Algo("rloo_synthetic", "kl_coef", "kl", online=True),
}
# deterministic preferences: (algo, strength); MPO's pair-KL beta is 0.1 in both its runs
DETERMINISTIC = (("dpo", 0.1), ("dpo", 0.5), ("mpo", 0.0), ("mpo", 1.0))


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one sweep (everything else is the config files' defaults)."""

    sft_steps: int = 400
    offline_steps: int = 60
    online_steps: int = 20
    evals: int = 6  # evaluations per run (every steps // evals steps, and at the end)
    eval_prompts: int = 128
    strengths: tuple = (
        ("dpo", (0.03, 0.1, 0.3)), ("ipo", (0.3, 1.0, 3.0)), ("mpo", (0.1, 0.5, 2.0)),
        ("p3o_v1", (0.01, 0.05, 0.2)), ("p3o_v2", (0.01, 0.05, 0.2)),
        ("ppo", (0.01, 0.05, 0.2)), ("online_dpo", (0.03, 0.1, 0.3)),
        ("grpo", (0.0, 0.04, 0.2)), ("dr_grpo", (0.0, 0.04, 0.2)), ("rloo", (0.01, 0.05, 0.2)))
    det_steps: int = 60
    deterministic: tuple = DETERMINISTIC
    seed: int = 0  # every run's config seed (model init of the SFT run, data, sampling)
    num_train: int = 0  # training pairs / prompts generated per preference run; 0: the config's


SETTINGS = {
    "default": Setting(num_train=2048),
    "small": Setting(sft_steps=150, offline_steps=30, online_steps=8, evals=3, eval_prompts=64,
                     strengths=(("dpo", (0.1,)), ("ppo", (0.05,)), ("grpo", (0.04,)),
                                ("dr_grpo", (0.04,)), ("rloo", (0.05,))), det_steps=30,
                     num_train=1024),
    "full": Setting(sft_steps=400, offline_steps=200, online_steps=60, evals=10,
                    eval_prompts=256, det_steps=200, strengths=(
                        ("dpo", (0.01, 0.03, 0.1, 0.3, 1.0)), ("ipo", (0.1, 0.3, 1.0, 3.0, 10.0)),
                        ("mpo", (0.03, 0.1, 0.5, 2.0, 8.0)),
                        ("p3o_v1", (0.003, 0.01, 0.05, 0.2, 0.5)),
                        ("p3o_v2", (0.003, 0.01, 0.05, 0.2, 0.5)),
                        ("ppo", (0.003, 0.01, 0.05, 0.2, 0.5)),
                        ("online_dpo", (0.01, 0.03, 0.1, 0.3, 1.0)),
                        ("grpo", (0.0, 0.01, 0.04, 0.2, 0.5)),
                        ("dr_grpo", (0.0, 0.01, 0.04, 0.2, 0.5)),
                        ("rloo", (0.003, 0.01, 0.05, 0.2, 0.5)))),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run: a config file, its argument, field overrides, and its workdir."""

    name: str  # algorithm label in the CSVs
    knob: str
    strength: float
    config: str
    arg: str
    overrides: tuple  # ((dotted field, value), ...)
    workdir: str
    online: bool = False


def _config(job: Job):
    """The job's locked config (`prefjax.demo.load_config` plus the overrides)."""
    from prefjax.demo import load_config

    c = load_config(job.config, job.arg)
    for field, value in job.overrides:
        *path, leaf = field.split(".")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def jobs_of(setting: Setting, out: pathlib.Path) -> tuple[Job, list[Job], list[Job]]:
    """(SFT job, frontier jobs, deterministic-preference jobs) of a setting."""
    sft_dir = out / "runs" / "sft"
    prompts = ("eval.num_prompts", setting.eval_prompts)
    sft = Job("sft", "", 0.0, "sft_synthetic", "", (
        ("seed", setting.seed), ("train.num_steps", setting.sft_steps),
        ("train.eval_every", setting.sft_steps), ("train.save_every", setting.sft_steps)),
        str(sft_dir))

    def job(name, s, steps, group, labeling="bt"):
        a = ALGOS[name]
        arg = ",".join(filter(None, (a.fixed, f"{a.arg}={s:g}", f"init_from={sft_dir}",
                                     f"labeling={labeling}" if labeling != "bt" else "")))
        over = [("seed", setting.seed), ("train.num_steps", steps),
                ("train.eval_every", max(steps // setting.evals, 1)),
                ("train.save_every", steps), ("train.export_hf", False), prompts]
        if not a.online:
            over.append(("eval.sample", True))
        if setting.num_train:
            over.append(("data.num_train", setting.num_train))
        if name == "mpo":  # mpo.samples_per_batch (16) a step: each sample used once
            over.append(("mpo.num_ref_samples", steps * 16))
        tag = f"{name}_{a.knob}{s:g}"
        return Job(name, a.knob, float(s), a.config, arg, tuple(over), str(out / "runs" / group
                                                                           / tag), a.online)

    frontier = [job(name, s, setting.online_steps if ALGOS[name].online
                    else setting.offline_steps, "frontier")
                for name, strengths in setting.strengths for s in strengths]
    det = [job(name, s, setting.det_steps, "deterministic", labeling="argmax")
           for name, s in setting.deterministic]
    return sft, frontier, det


def finished(job: Job) -> bool:
    """Whether `job.workdir` holds the finished run (its config is checked: a workdir that ran
    another config fails loudly instead of being reused)."""
    from prefjax.train.offline import write_config

    c = _config(job)
    wd = pathlib.Path(job.workdir)
    done = (wd / "checkpoints" / str(c.train.num_steps)).is_dir()
    if done:
        write_config(c, wd)  # raises, naming the fields, when the config differs
    return done


def train(job: Job) -> float:
    """Run (or resume) one job in this process; returns its wall time in seconds."""
    import datasets

    from prefjax.main import run

    logging.getLogger("absl").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    run(_config(job), job.workdir)
    return time.perf_counter() - t0


def train_all(jobs: list[Job], *, workers: int) -> dict[str, float]:
    """Run the unfinished jobs, `workers` at a time in spawned processes (1: in this process);
    returns {workdir: seconds} of those that ran."""
    todo = [j for j in jobs if not finished(j)]
    if workers <= 1 or not todo:
        return {j.workdir: train(j) for j in todo}
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {j.workdir: ex.submit(train, j) for j in todo}
        return {wd: f.result() for wd, f in futures.items()}


def origin_reward(job: Job) -> float:
    """Ground-truth reward of the initial (SFT) policy under the job's own sampled evaluation
    (the same held-out prompts, batches and sampling key as the trainer's eval): its step-0
    point, whose KL(pi || ref) is 0 by construction (the trainers evaluate from step
    `eval_every` on)."""
    c = _config(job)
    return _origin(job.online, c.model.init_from, c.data.labeling, c.seed, c.train.batch_size,
                   c.eval.num_prompts, c.online.max_new_tokens, c.data.num_eval)


@functools.cache
def _origin(online, init_from, labeling, seed, bs, num_prompts, max_new_tokens, num_eval):
    import jax

    from prefjax.config import base_config
    from prefjax.data import BatchLoader, collate_prompts
    from prefjax.eval import sample_metrics
    from prefjax.train import build
    from prefjax.train.online import eval_reward_fn

    c = base_config()
    c.model.init_from, c.data.labeling, c.seed = init_from, labeling, seed
    c.data.num_train, c.data.num_eval = bs, num_eval  # only the held-out split is used
    tok = build.load_tokenizer(c)
    _, held = build.load_data(c, tok, "prompts" if online else "pairs")
    model = build.decoder_fn(c, tok)  # the SFT export
    n = min(len(held), num_prompts) // bs * bs
    collate = functools.partial(collate_prompts, pad_id=tok.pad_token_id,
                                seq_len=c.data.max_prompt_length)
    if online:  # as prefjax.train.online.train builds its eval prompts
        prompts = list(BatchLoader(held.select(range(n)), batch_size=bs, collate=collate, seed=0,
                                   num_epochs=1))
    else:  # as prefjax.train.offline._sampled_eval does
        rows = held.select(range(n))["prompt_ids"]
        prompts = [collate([{"prompt_ids": p} for p in rows[i:i + bs]]) for i in range(0, n, bs)]
    res = sample_metrics(model, None, prompts, key=jax.random.key(seed + 7),
                         reward_fn=eval_reward_fn(c, tok), max_new_tokens=max_new_tokens,
                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    return res["reward"]


def points(job: Job) -> list[dict]:
    """(step, kl, reward) records of a finished job, the step-0 point first."""
    from prefjax.metrics import read_metrics

    pre = "eval/" if job.online else "eval/sample/"
    sft = origin_reward(job)
    rows = [{"step": 0, "kl": 0.0, "reward": sft}]
    rows += [{"step": r["step"], "kl": r[f"{pre}kl"], "reward": r[f"{pre}reward"]}
             for r in read_metrics(job.workdir) if f"{pre}kl" in r]
    return [{"algo": job.name, "knob": job.knob, "strength": job.strength, **r,
             "gain": r["reward"] - sft} for r in rows]


FIELDS = ("algo", "knob", "strength", "step", "kl", "reward", "gain")


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "strength": f"{r['strength']:g}",
                        **{k: f"{r[k]:.5f}" for k in ("kl", "reward", "gain")}})


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path) as fh:
        return [{**r, "strength": float(r["strength"]), "step": int(r["step"]),
                 **{k: float(r[k]) for k in ("kl", "reward", "gain")}} for r in csv.DictReader(fh)]


def envelope(kl: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper envelope (Pareto front) of points: those no other point beats with at most
    their KL; sorted by KL."""
    order = np.lexsort((-reward, kl))
    best, keep = -np.inf, []
    for i in order:
        if reward[i] > best:
            best = reward[i]
            keep.append(i)
    return kl[keep], reward[keep]


def runs_of(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (algo, strength), each sorted by step."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["algo"], r["strength"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


COLORS = {"dpo": "tab:blue", "ipo": "tab:orange", "mpo": "tab:green", "p3o_v1": "tab:red",
          "p3o_v2": "tab:purple", "ppo": "tab:brown", "online_dpo": "tab:pink",
          "grpo": "tab:olive", "dr_grpo": "tab:cyan", "rloo": "tab:gray"}
MARKERS = "osD^v<>"


def plot_frontier(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Reward gain vs KL. Left: every run, one colour per algorithm, one marker per strength
    (ascending), a thin line through its evaluations from the SFT policy at (0, 0). Right: each
    algorithm's upper envelope over all its runs and steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_env) = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    runs = runs_of(rows)
    for algo in dict.fromkeys(r["algo"] for r in rows):
        color = COLORS.get(algo, "k")
        for j, s in enumerate(sorted({s for a, s in runs if a == algo})):
            run = runs[(algo, s)]
            ax.plot([r["kl"] for r in run], [r["gain"] for r in run], "-", color=color, lw=0.8,
                    alpha=0.5)
            ax.plot([r["kl"] for r in run[1:]], [r["gain"] for r in run[1:]],
                    MARKERS[j % len(MARKERS)], color=color, ms=5, alpha=0.8,
                    label=f"{algo} {run[0]['knob']}={s:g}")
        pts = [r for r in rows if r["algo"] == algo]
        ex, ey = envelope(np.array([r["kl"] for r in pts]), np.array([r["gain"] for r in pts]))
        ax_env.plot(ex, ey, "o-", color=color, lw=2.2, ms=4, label=algo)
    for a in (ax, ax_env):
        a.plot([0], [0], "k*", ms=11)
        a.axhline(0, color="k", lw=0.6)
        a.set_xscale("symlog", linthresh=0.1)
        a.set_xlim(left=min(0.0, 1.2 * min(r["kl"] for r in rows)))  # k1 estimates can be < 0
        a.set_xlabel("KL(pi || ref) of sampled responses (nats; linear below 0.1, log above)")
        a.grid(alpha=0.3)
    ax.set_ylabel("r* gain over the SFT policy (same eval prompts)")
    ax.set_title("every run: evaluations every few steps (star: SFT policy)", fontsize=9)
    ax_env.set_title("upper envelope of each algorithm (all strengths and steps)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    ncol = max(len({r["algo"] for r in rows}), 1)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)  # fills columns
    ax_env.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * -(-len(labels) // ncol), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_deterministic(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """KL(pi || ref) and reward over training steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = ("-", "--", ":", "-.")
    for i, ((algo, s), run) in enumerate(runs_of(rows).items()):
        label = f"{algo} {run[0]['knob']}={s:g}"
        for ax, key in zip(axes, ("kl", "reward")):
            ax.plot([r["step"] for r in run], [r[key] for r in run], "o" + styles[i % 4],
                    color=COLORS.get(algo, "k"), ms=4, label=label)
    axes[0].set_ylabel("KL(pi || ref) of sampled responses (nats)")
    axes[1].set_ylabel("ground-truth reward r*")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """Per run: its final evaluation (KL, reward, gain over the SFT policy) and its best gain."""
    lines = [f"{'algo':<12}{'knob':<9}{'strength':>9}{'step':>6}{'KL':>8}{'reward':>8}"
             f"{'SFT':>7}{'gain':>8}{'best gain (KL)':>18}"]
    for (algo, s), run in runs_of(rows).items():
        last, best = run[-1], max(run, key=lambda r: r["gain"])
        lines.append(f"{algo:<12}{last['knob']:<9}{s:>9g}{last['step']:>6}{last['kl']:>8.3f}"
                     f"{last['reward']:>8.3f}{run[0]['reward']:>7.3f}{last['gain']:>+8.3f}"
                     f"{best['gain']:>+10.3f} ({best['kl']:.2f})")
    return "\n".join(lines)


def run(setting: Setting = SETTINGS["default"], out: pathlib.Path = DEFAULT_OUT, *,
        workers: int = 2, frontier: bool = True, deterministic: bool = True) -> dict:
    """Train (or reuse) the SFT run and the sweeps under `out/runs`, write the CSVs and figures
    to `out`; returns {"frontier": rows, "deterministic": rows, "seconds": {...}}."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sft, fr_jobs, det_jobs = jobs_of(setting, out)
    jobs = (fr_jobs if frontier else []) + (det_jobs if deterministic else [])
    t0 = time.perf_counter()
    seconds = train_all([sft], workers=workers)
    seconds.update(train_all(jobs, workers=workers))
    res = {"seconds": seconds, "frontier": [], "deterministic": []}
    for key, group, plot, title in (
            ("frontier", fr_jobs if frontier else [], plot_frontier,
             "KL-reward frontier, synthetic task, Bradley-Terry labels "
             f"({setting.offline_steps} offline / {setting.online_steps} online steps)"),
            ("deterministic", det_jobs if deterministic else [], plot_deterministic,
             f"deterministic preferences (labeling=argmax), {setting.det_steps} steps")):
        if not group:
            continue
        rows = [p for j in group for p in points(j)]
        write_csv(rows, out / f"{key}.csv")
        plot(rows, out / f"{key}.png", title)
        res[key] = rows
    res["total_seconds"] = time.perf_counter() - t0
    timing = out / "timing.json"  # training seconds of each run, kept across cached re-runs
    old = json.loads(timing.read_text()) if timing.exists() else {}
    runs = {**old.get("runs", {}),
            **{str(pathlib.Path(k).relative_to(out)): round(v, 1) for k, v in seconds.items()}}
    timing.write_text(json.dumps({"runs": runs, "last_invocation_seconds": res["total_seconds"],
                                  "last_invocation_trained": len(seconds)}, indent=1))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="seconds-per-run smoke setting")
    size.add_argument("--full", action="store_true", help="longer runs, 5 strengths each")
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once (processes)")
    ap.add_argument("--only", choices=("frontier", "deterministic"), default=None,
                    help="run one of the two experiments")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (SFT included)")
    ap.add_argument("--algos", default="", help="comma-separated frontier algorithms to run "
                    f"(default: all of the setting's; names: {', '.join(ALGOS)})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    setting = SETTINGS["small" if args.small else "full" if args.full else "default"]
    setting = dataclasses.replace(setting, seed=args.seed)
    if args.algos:
        keep = args.algos.split(",")
        unknown = sorted(set(keep) - set(ALGOS))
        if unknown:
            ap.error(f"--algos: unknown {unknown}; valid: {', '.join(ALGOS)}")
        setting = dataclasses.replace(
            setting, strengths=tuple(x for x in setting.strengths if x[0] in keep))
    res = run(setting, args.out, workers=args.workers, frontier=args.only != "deterministic",
              deterministic=args.only != "frontier")
    for key in ("frontier", "deterministic"):
        if res[key]:
            print(f"{key}: final evaluation of each run (SFT: reward of the SFT policy on the "
                  "same eval prompts; gain = reward - SFT), and its best gain with that KL")
            print(table(res[key]))
    print(f"wrote {args.out} in {res['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
