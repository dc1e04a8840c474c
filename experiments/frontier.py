"""KL-reward frontiers on the synthetic task (as in the P3O paper), and MPO vs DPO under
deterministic preferences.

PLACEHOLDER: the measured summary goes here.
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
}
# deterministic preferences: (name, algo, strength); MPO's pair-KL beta is 0.1 in both runs
DETERMINISTIC = (("dpo", "dpo", 0.1), ("dpo", "dpo", 0.5),
                 ("mpo_alpha0", "mpo", 0.0), ("mpo", "mpo", 1.0))


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
        ("ppo", (0.01, 0.05, 0.2)), ("online_dpo", (0.03, 0.1, 0.3)))
    det_steps: int = 60
    deterministic: tuple = DETERMINISTIC
    seed: int = 0  # every run's config seed (model init of the SFT run, data, sampling)
    num_train: int = 0  # training pairs / prompts generated per preference run; 0: the config's


SETTINGS = {
    "default": Setting(num_train=2048),
    "small": Setting(sft_steps=150, offline_steps=30, online_steps=8, evals=3, eval_prompts=64,
                     strengths=(("dpo", (0.1,)), ("ppo", (0.05,))), det_steps=30,
                     num_train=1024),
    "full": Setting(sft_steps=400, offline_steps=200, online_steps=60, evals=10,
                    eval_prompts=256, det_steps=200, strengths=(
                        ("dpo", (0.01, 0.03, 0.1, 0.3, 1.0)), ("ipo", (0.1, 0.3, 1.0, 3.0, 10.0)),
                        ("mpo", (0.03, 0.1, 0.5, 2.0, 8.0)),
                        ("p3o_v1", (0.003, 0.01, 0.05, 0.2, 0.5)),
                        ("p3o_v2", (0.003, 0.01, 0.05, 0.2, 0.5)),
                        ("ppo", (0.003, 0.01, 0.05, 0.2, 0.5)),
                        ("online_dpo", (0.01, 0.03, 0.1, 0.3, 1.0)))),
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

    def job(name, algo_name, s, steps, group, labeling="bt"):
        a = ALGOS[algo_name]
        arg = ",".join(filter(None, (a.fixed, f"{a.arg}={s:g}", f"init_from={sft_dir}",
                                     f"labeling={labeling}" if labeling != "bt" else "")))
        over = [("seed", setting.seed), ("train.num_steps", steps),
                ("train.eval_every", max(steps // setting.evals, 1)),
                ("train.save_every", steps), ("train.export_hf", False), prompts]
        if not a.online:
            over.append(("eval.sample", True))
        if setting.num_train:
            over.append(("data.num_train", setting.num_train))
        if algo_name == "mpo":  # mpo.samples_per_batch (16) a step: each sample used once
            over.append(("mpo.num_ref_samples", steps * 16))
        tag = f"{name}_{a.knob}{s:g}"
        return Job(name, a.knob, float(s), a.config, arg, tuple(over), str(out / "runs" / group
                                                                           / tag), a.online)

    frontier = [job(name, name, s, setting.online_steps if ALGOS[name].online
                    else setting.offline_steps, "frontier")
                for name, strengths in setting.strengths for s in strengths]
    det = [job(name, algo, s, setting.det_steps, "deterministic", labeling="argmax")
           for name, algo, s in setting.deterministic]
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
    point, whose KL(pi || ref) is 0 by construction (the trainers evaluate from step 1 on)."""
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
          "mpo_alpha0": "tab:olive"}
MARKERS = "osD^v<>"


def plot_frontier(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Reward gain vs KL. Left: every run, one colour per algorithm, one marker per strength
    (ascending), a thin line through its evaluations from the SFT policy at (0, 0). Right: each
    algorithm's upper envelope over all its runs and steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_env) = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True, sharey=True)
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
        a.set_xlim(left=0)
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
    (out / "timing.json").write_text(json.dumps(
        {"total_seconds": res["total_seconds"], "runs": seconds}, indent=1))
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    setting = SETTINGS["small" if args.small else "full" if args.full else "default"]
    setting = dataclasses.replace(setting, seed=args.seed)
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
