"""IPO's bandit illustration (Azar et al. 2023, sections 5.3-5.4) run with prefjax's own losses.

Setting (ALGORITHMS.md section 2). Three actions a, b, c, no context. The "model" is a tabular
softmax policy pi = softmax(theta), theta in R^3, started at the reference policy (uniform unless
`ref_probs` is given). Datasets of deterministic preferences, (winner, loser) pairs:

  d1  {(a,b), (b,c), (a,c)}  the total order a > b > c, every pair observed once (the paper's D1);
  d3  {(a,b), (b,a), (b,c)}  ALGORITHMS.md's reconstructed D3': a and b tie, c loses its only
                             comparison, (a,c) is never observed.

Every loss is `prefjax.losses.get(name, **hp)` applied to a PolicyOut built from the tabular
log-probs (one "token" per response: token_logps [b, 1], lengths 1, so IPO's averaging is moot).
Each step uses the whole dataset: the paper samples minibatches of 9 pairs with replacement, whose
expected loss is this one, so full batches reach the same optimum without seed noise. Adam, lr 0.01,
18,000 steps (the paper's protocol; here the rate decays to 0 over the last fifth, see `fit`);
one jit per method: `lax.scan` over steps inside `vmap` over the strength sweep.

One x-axis, the regularization strength s: every method is `max E[preference] - s * KL`:
  DPO    beta   weight of KL(pi || ref) against the Bradley-Terry reward (an unbounded logit);
  IPO    tau    weight of KL(pi || ref) against the preference probability (prefjax's `beta`);
  MPO    alpha  weight of the off-policy KL(ref || pi) on reference samples, pair KL off;
  MPO    beta   weight of the pairwise-preference KL (either direction), off-policy KL off:
                this is "MPO without its off-policy KL".
The scales are nominal: DPO's reward is a logit, IPO's and MPO's a probability in [0, 1].

Two mechanics worth knowing. MPO's reference samples are exact expectations: one row per action
carrying m * ref(y) * log pi(y), so the token-mean NLL over the m = 3 rows is E_{y~ref}[-log pi(y)].
`mpo` branches on its weights in Python (`if beta:`), so a traced strength cannot be passed to it;
its loss is affine in each weight, so the sweep evaluates the registry loss at weight 0 and weight 1
and interpolates (exact; tests check it against `get("mpo", beta=s)`). DPO and IPO take the traced
strength as a rebound keyword of the same registry function.

Measured (experiments/results/bandit/bandit.csv, default run, uniform reference, x = 0.01 .. 10;
`drift` = how much pi moved in the second half of training):
  * IPO equals its closed form (least squares on the pair margins, `ipo_optimum`) to 1e-6 at every
    tau and returns smoothly to the reference: on d1 pi = (0.964, 0.034, 0.001) at tau 0.1,
    (0.448, 0.321, 0.230) at 1, (0.345, 0.333, 0.322) at 10; KL(pi || ref) falls monotonically
    (0.94, 0.036, 0.0004). On d3 pi(c) falls gradually: 0.003, 0.233, 0.322.
  * DPO ends greedy for beta <= 1 (d1: pi(a) > 0.99999; d3: pi(c) < 1e-5), but NOT whatever
    beta: pi(a) = 0.989, 0.933, 0.806 at beta = 3.2, 5.6, 10 on d1 (pi(c) = 0.084 at beta 10 on
    d3). Those runs are not at an optimum: DPO's loss only vanishes like exp(-beta * margin),
    Adam's step shrinks with it, and pi(a) is still rising (drift 0.08 at beta 10; 0.946 after
    180,000 steps). So "greedy whatever beta" holds for DPO's optimum; a finite Adam budget
    reaches it only for beta up to about 1-3 (ALGORITHMS.md reports 0.82 at beta 10 too).
  * MPO with its off-policy KL settles at a finite optimum (drift < 4e-4) that approaches the
    reference as alpha grows: d1 pi(a) = 0.980, 0.831, 0.481, 0.350 at alpha 0.01, 0.1, 1, 10.
    Its KL to the reference is below DPO's at every x on d1, and on d3 for x >= 0.018; at
    alpha = 0.01 on d3 it is 0.425 against DPO's 0.405, because the tie (a,b), (b,a) gives MPO's
    probability-valued preference term no gradient at all (sigma(h) + sigma(-h) = 1): pi(a) is
    pinned at exactly ref(a) = 1/3 by the forward KL while b takes c's mass, where DPO and IPO
    split it evenly between a and b.
  * MPO without the off-policy KL (alpha = 0) is regularized too in this reconstruction: the
    pairwise KL to p_ref = 1/2 alone gives each pair a finite optimum (margin 1/beta for one pair
    with KL(p || p_ref)): d1 pi(a) = 0.9999, 0.576, 0.356 at beta 0.1, 1, 10 (KL(p_ref || p):
    0.903, 0.538, 0.356). So on this bandit the MPO paper's claims that only its off-policy KL
    makes the regularization effective, and that IPO's does not, are not reproduced: with every
    action in some pair, IPO and both MPO regularizers all keep the policy near the reference
    at large strength; only DPO does not.

Usage: python experiments/bandit.py --out DIR [--steps N] [--small]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefjax import losses
from prefjax.typing import PolicyOut

ACTIONS = ("a", "b", "c")
DATASETS = {
    "d1": ((0, 1), (1, 2), (0, 2)),
    "d3": ((0, 1), (1, 0), (1, 2)),
}
STRENGTHS = tuple(float(s) for s in np.logspace(-2, 1, 13))  # 0.01 .. 10, 4 per decade
SMALL = {"steps": 6000, "strengths": (0.1, 0.3, 1.0, 3.0, 10.0)}
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "bandit"


@dataclasses.dataclass(frozen=True)
class Method:
    label: str  # panel title
    loss: str  # prefjax.losses registry name
    knob: str  # the hyperparameter the strength sets
    fixed: tuple = ()  # other hyperparameters, (name, value) pairs


METHODS = {
    "dpo": Method("DPO (x = beta)", "dpo", "beta"),
    "ipo": Method("IPO (x = tau)", "ipo", "beta", (("average", False),)),
    "mpo_ref_kl": Method("MPO off-policy KL\n(x = alpha, pair KL off)", "mpo", "alpha",
                         (("beta", 0.0),)),
    "mpo_pair_kl": Method("MPO pair KL(p||p_ref)\n(x = beta, off-policy KL off)", "mpo", "beta",
                          (("alpha", 0.0),)),
    "mpo_pair_kl_rev": Method("MPO pair KL(p_ref||p)\n(x = beta, off-policy KL off)", "mpo",
                              "beta", (("alpha", 0.0), ("pair_kl_direction", "ref_policy"))),
}


def check(method: Method, strengths) -> None:
    """The registry checks every value of the sweep, naming a bad one, before anything is traced."""
    for s in strengths:
        losses.get(method.loss, **dict(method.fixed), **{method.knob: float(s)})


def rows_of(method: Method, pairs, log_ref: jax.Array) -> tuple[np.ndarray, jax.Array, dict]:
    """(rows, weight, batch) of one dataset: the action of each batch row (chosen rows first, then
    rejected, then for MPO one reference-sample row per action), each row's log-prob weight, and
    the batch (`ref_logps` [b], MPO's `ref_sample_mask` [K])."""
    k = log_ref.shape[0]
    rows = np.array([p[0] for p in pairs] + [p[1] for p in pairs], np.int32)
    weight = jnp.ones(len(rows), jnp.float32)
    batch = {}
    if method.loss == "mpo":  # the token-mean over the K sample rows is then E_{y~ref}[.]
        rows = np.concatenate([rows, np.arange(k, dtype=np.int32)])
        weight = jnp.concatenate([weight, k * jnp.exp(log_ref)])
        batch["ref_sample_mask"] = jnp.ones((k,), jnp.float32)
    batch["ref_logps"] = log_ref[rows]
    return rows, weight, batch


def objective(method: Method, rows, weight, batch: dict) -> Callable:
    """`f(theta, s)`: the method's registry loss on the whole dataset at logits theta [K] and
    strength s (a traced scalar is fine)."""
    fixed = dict(method.fixed)
    if method.loss == "mpo":  # affine in its weights, which it needs as Python numbers
        at0 = losses.get("mpo", **fixed, **{method.knob: 0.0})
        at1 = losses.get("mpo", **fixed, **{method.knob: 1.0})

        def loss(out, s):
            l0 = at0(out, batch)[0]
            return l0 + s * (at1(out, batch)[0] - l0)
    else:  # the same registry function, its knob rebound to s at each call
        fn = losses.get(method.loss, **fixed, **{method.knob: 1.0})

        def loss(out, s):
            return fn(out, batch, **{method.knob: s})[0]

    def f(theta, s):
        logps = jax.nn.log_softmax(theta)[rows] * weight
        return loss(PolicyOut(logps[:, None], logps, jnp.ones_like(logps)), s)
    return f


@functools.partial(jax.jit, static_argnames=("method", "steps"))
def fit(method: Method, rows, weight, batch: dict, theta0, strengths, *, steps: int, lr):
    """Adam on the objective for every strength at once (`vmap` over `strengths` [S], `lax.scan`
    over steps); returns the logits after steps // 2 and at the end, [S, K] each.

    Static: `method` and `steps`, so datasets of one size share a compilation. The learning rate
    is constant (the paper's protocol), then decays linearly to 0 over the last fifth of the
    steps: at a constant rate Adam keeps circling a finite optimum at a radius of about lr, which
    would blur the closed-form comparisons at large tau.
    """
    f = objective(method, rows, weight, batch)
    tail = max(steps // 5, 1)
    opt = optax.adam(lambda t: lr * jnp.clip((steps - t) / tail, 0.0, 1.0))

    def train(s):
        def step(carry, _):
            theta, state = carry
            upd, state = opt.update(jax.grad(f)(theta, s), state)
            return (optax.apply_updates(theta, upd), state), None

        carry, _ = jax.lax.scan(step, (theta0, opt.init(theta0)), length=steps // 2)
        half = carry[0]
        carry, _ = jax.lax.scan(step, carry, length=steps - steps // 2)
        return half, carry[0]

    return jax.vmap(train)(strengths)


def ipo_optimum(pairs, log_ref: np.ndarray, tau: float, theta0: np.ndarray | None = None
                ) -> np.ndarray:
    """IPO's exact minimizer (float64 logits [K]): Eq. 17 is least squares on the pair margins
    h_i = theta_w - theta_l - (ref_w - ref_l) with target 1/(2 tau); the minimum-norm step from
    theta0 (default log_ref) is where gradient descent from theta0 lands."""
    log_ref = np.asarray(log_ref, np.float64)
    theta0 = log_ref if theta0 is None else np.asarray(theta0, np.float64)
    a = np.zeros((len(pairs), len(log_ref)))
    for i, (w, l) in enumerate(pairs):
        a[i, w], a[i, l] = 1.0, -1.0
    target = 1 / (2 * tau) + a @ log_ref
    return theta0 + np.linalg.lstsq(a, target - a @ theta0, rcond=None)[0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis (0 log 0 = 0)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0), -1)


def run(*, steps: int = 18_000, strengths=STRENGTHS, datasets=("d1", "d3"),
        methods=tuple(METHODS), ref_probs=None, lr: float = 0.01) -> dict:
    """Train every method on every dataset over the strength sweep.

    `datasets` are names of DATASETS or a {name: ((winner, loser), ...)} dict. Returns
    {"actions", "strengths" [S], "ref_probs" [K], "steps", "lr",
     "runs": {dataset: {method: {"probs", "probs_half", "logps" [S, K], "kl" [S]}}},
     "ipo_closed_form": {dataset: probs [S, K]}}; "kl" is KL(pi || ref), "probs_half" the policy
    after steps // 2 (a run still moving in its second half has not converged).
    """
    sets = datasets if isinstance(datasets, dict) else {d: DATASETS[d] for d in datasets}
    k = len(ACTIONS)
    ref = np.full(k, 1 / k) if ref_probs is None else np.asarray(ref_probs, np.float64)
    if ref.shape != (k,) or np.any(ref <= 0) or not np.isclose(ref.sum(), 1):
        raise ValueError(f"ref_probs must be {k} positive probabilities summing to 1, got {ref}")
    log_ref = jnp.log(jnp.asarray(ref, jnp.float32))
    strengths = np.asarray(strengths, np.float64)
    out = {"actions": ACTIONS, "strengths": strengths, "ref_probs": ref, "steps": steps, "lr": lr,
           "runs": {}, "ipo_closed_form": {}}
    for dname, pairs in sets.items():
        out["runs"][dname] = {}
        for mname in methods:
            method = METHODS[mname]
            check(method, strengths)
            half, final = fit(method, *rows_of(method, pairs, log_ref), log_ref,
                              jnp.asarray(strengths, jnp.float32), steps=steps, lr=lr)
            logps = np.asarray(jax.nn.log_softmax(final), np.float64)
            probs = np.exp(logps)
            out["runs"][dname][mname] = {
                "probs": probs, "logps": logps, "kl": kl(probs, ref),
                "probs_half": np.asarray(jax.nn.softmax(half), np.float64)}
        out["ipo_closed_form"][dname] = np.stack(
            [_softmax(ipo_optimum(pairs, np.log(ref), s)) for s in strengths])
    return out


def write_csv(res: dict, path: pathlib.Path) -> None:
    """One row per (dataset, method, strength); `drift` = max |pi(end) - pi(steps // 2)|."""
    names = [f"pi_{a}" for a in res["actions"]]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "method", "knob", "strength", *names, "kl_to_ref", "drift"])
        for dname, runs in res["runs"].items():
            rows = [(m, METHODS[m].knob, r["probs"], r["kl"],
                     np.abs(r["probs"] - r["probs_half"]).max(-1)) for m, r in runs.items()]
            cf = res["ipo_closed_form"][dname]
            rows.append(("ipo_closed_form", "beta", cf, kl(cf, res["ref_probs"]),
                         np.full(len(cf), np.nan)))
            for m, knob, probs, kls, drift in rows:
                for s, p, d, dr in zip(res["strengths"], probs, kls, drift):
                    w.writerow([dname, m, knob, f"{s:.4g}", *(f"{x:.6f}" for x in p),
                                f"{d:.6f}", "" if np.isnan(dr) else f"{dr:.2e}"])


def plot(res: dict, path: pathlib.Path) -> None:
    """Rows = datasets, one panel per method: action probabilities vs strength (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dsets = list(res["runs"])
    methods = list(res["runs"][dsets[0]])
    fig, axes = plt.subplots(len(dsets), len(methods), figsize=(3.3 * len(methods),
                             2.9 * len(dsets)), sharex=True, sharey=True, squeeze=False)
    s = res["strengths"]
    colors = ("tab:blue", "tab:orange", "tab:green")
    for i, dname in enumerate(dsets):
        for j, mname in enumerate(methods):
            ax = axes[i, j]
            probs = res["runs"][dname][mname]["probs"]
            for a, (act, c) in enumerate(zip(res["actions"], colors)):
                # thinner each time, so tied actions (a and b on d3) stay visible
                ax.plot(s, probs[:, a], "o-", ms=4 - a, lw=2.6 - 0.8 * a, color=c,
                        label=f"pi({act})")
                ax.axhline(res["ref_probs"][a], color=c, ls=":", lw=0.8)
                if mname == "ipo":
                    ax.plot(s, res["ipo_closed_form"][dname][:, a], "x", color="k", ms=4,
                            label="IPO closed form" if a == len(colors) - 1 else None)
            ax.set_xscale("log")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(METHODS[mname].label, fontsize=9)
            if i == len(dsets) - 1:
                ax.set_xlabel("regularization strength x")
            if j == 0:
                ax.set_ylabel(f"{dname}: final probability")
    handles, labels = axes[0, 1 if len(methods) > 1 else 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"IPO bandit, prefjax losses: Adam lr {res['lr']}, {res['steps']} steps, "
                 "dotted = reference", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(res: dict) -> str:
    """Per dataset: pi(a), pi(c) and KL(pi || ref) of every method at every strength."""
    lines = []
    for dname, runs in res["runs"].items():
        lines += [f"dataset {dname} {DATASETS.get(dname, '')}: pi(a) pi(c) KL(pi||ref)",
                  f"{'x':>7}" + "".join(f"{m:>22}" for m in runs)]
        for i, s in enumerate(res["strengths"]):
            cells = "".join(f"{r['probs'][i, 0]:>8.3f}{r['probs'][i, -1]:>7.3f}{r['kl'][i]:>7.3f}"
                            for r in runs.values())
            lines.append(f"{s:>7.3g}{cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--steps", type=int, default=None, help="Adam steps (default 18000)")
    ap.add_argument("--small", action="store_true", help="fewer steps and strengths (smoke run)")
    args = ap.parse_args(argv)
    kw = dict(SMALL) if args.small else {}
    if args.steps is not None:
        kw["steps"] = args.steps
    t0 = time.perf_counter()
    res = run(**kw)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(res, args.out / "bandit.csv")
    plot(res, args.out / "bandit.png")
    print(table(res))
    print(f"wrote {args.out / 'bandit.csv'} and {args.out / 'bandit.png'} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
