"""Float64 NumPy re-derivations of GRPO / GSPO / DAPO / Dr. GRPO, RLOO, REINFORCE++ and KTO,
written from the papers' formulas (and TRL 1.16's documented conventions), not from prefjax code.

Rollout rows are sample-major: row i*B + j is sample i of prompt j. Loops over rows / tokens
keep each formula plain.
"""

from __future__ import annotations

import numpy as np


def std1(x):
    """Bessel-corrected standard deviation (0 for one element)."""
    x = np.asarray(x, np.float64)
    return 0.0 if x.size < 2 else float(np.sqrt(((x - x.mean()) ** 2).sum() / (x.size - 1)))


def group_of(b, k):
    """Row indices of each prompt's group: prompt j -> [j, j + B, .., j + (k-1) B]."""
    n = b // k
    return [[i * n + j for i in range(k)] for j in range(n)]


def group_advantages(rewards, k, scale="group"):
    r = np.asarray(rewards, np.float64)
    adv = np.zeros_like(r)
    batch_std = std1(r)
    for g in group_of(len(r), k):
        mu, sd = r[g].mean(), std1(r[g])
        for i in g:
            a = r[i] - mu
            if scale == "group":
                a /= sd + 1e-4
            elif scale == "batch":
                a /= batch_std + 1e-4
            adv[i] = a
    return adv


def grpo(logps, old, adv, mask, *, loss_type="dapo", eps=0.2, eps_high=None, beta=0.0,
         ref=None, level="token", max_len=0, tis_cap=None, sample=None):
    """The GRPO-family loss; logps / old / ref / sample [b, t], adv [b] or [b, t], mask [b, t]."""
    lp, old = np.asarray(logps, np.float64), np.asarray(old, np.float64)
    m = np.asarray(mask) > 0
    b, t = lp.shape
    adv = np.asarray(adv, np.float64)
    eh = eps if eps_high is None else eps_high
    per = np.zeros((b, t))
    for r in range(b):
        toks = [j for j in range(t) if m[r, j]]
        seq_w = np.exp(np.mean([lp[r, j] - old[r, j] for j in toks])) if toks else 1.0
        for j in toks:
            a = adv[r, j] if adv.ndim == 2 else adv[r]
            w = seq_w if level == "sequence" else np.exp(lp[r, j] - old[r, j])
            v = -min(w * a, np.clip(w, 1 - eps, 1 + eh) * a)
            if tis_cap is not None:
                v *= min(np.exp(old[r, j] - sample[r, j]), tis_cap)
            if beta:
                d = ref[r, j] - lp[r, j]
                v += beta * (np.exp(d) - d - 1)
            per[r, j] = v
    rows = [r for r in range(b) if m[r].any()]
    if loss_type == "grpo":
        return np.mean([per[r].sum() / m[r].sum() for r in rows])
    if loss_type in ("dapo", "bnpo"):
        return per.sum() / m.sum()
    if loss_type == "dr_grpo":
        return per.sum() / (len(rows) * (max_len or t))
    raise ValueError(loss_type)


def shaped_returns(scores, logps, ref, mask, kl_coef, level="sequence"):
    """Sequence: R = s - c sum_t (lp - ref). Token: G_t = s - c sum_{u >= t} (lp - ref)_u."""
    lp, ref = np.asarray(logps, np.float64), np.asarray(ref, np.float64)
    m = np.asarray(mask) > 0
    s = np.asarray(scores, np.float64)
    if level == "sequence":
        return np.array([s[r] - kl_coef * sum(lp[r, j] - ref[r, j] for j in range(lp.shape[1])
                                               if m[r, j]) for r in range(len(s))])
    g = np.zeros(lp.shape)
    for r in range(len(s)):
        for j in range(lp.shape[1]):
            if m[r, j]:
                g[r, j] = s[r] - kl_coef * sum(lp[r, u] - ref[r, u]
                                               for u in range(j, lp.shape[1]) if m[r, u])
    return g


def _total(ret, mask):
    ret = np.asarray(ret, np.float64)
    if ret.ndim == 1:
        return ret
    m = np.asarray(mask) > 0
    return np.array([ret[r, np.argmax(m[r])] if m[r].any() else 0.0 for r in range(len(ret))])


def _sub(ret, mask, base):
    ret = np.asarray(ret, np.float64)
    if ret.ndim == 1:
        return ret - base
    return np.where(np.asarray(mask) > 0, ret - base[:, None], 0.0)


def _whiten(adv, mask):
    if adv.ndim == 1:
        return (adv - adv.mean()) / (std1(adv) + 1e-4)
    m = np.asarray(mask) > 0
    vals = adv[m]
    return np.where(m, (adv - vals.mean()) / (std1(vals) + 1e-4), 0.0)


def rloo_advantages(ret, mask, k, normalize=False):
    tot = _total(ret, mask)
    base = np.zeros_like(tot)
    for g in group_of(len(tot), k):
        for i in g:
            others = [tot[o] for o in g if o != i]
            base[i] = np.mean(others) if others else tot[i]
    adv = _sub(ret, mask, base)
    return _whiten(adv, mask) if normalize else adv


def reinforce_pp_advantages(ret, mask, k):
    tot = _total(ret, mask)
    base = np.zeros_like(tot)
    for g in group_of(len(tot), k):
        base[g] = tot[g].mean()
    return _whiten(_sub(ret, mask, base), mask)


def rloo(logps, old, adv, mask, *, eps=0.2, eps_high=None, tis_cap=None, sample=None):
    lp, old = np.asarray(logps, np.float64), np.asarray(old, np.float64)
    m = np.asarray(mask) > 0
    adv = np.asarray(adv, np.float64)
    eh = eps if eps_high is None else eps_high
    per = []
    for r in range(lp.shape[0]):
        toks = [j for j in range(lp.shape[1]) if m[r, j]]
        if adv.ndim == 1:
            w = np.exp(sum(lp[r, j] - old[r, j] for j in toks))
            v = -min(w * adv[r], np.clip(w, 1 - eps, 1 + eh) * adv[r])
            if tis_cap is not None:
                v *= min(np.exp(sum(old[r, j] - sample[r, j] for j in toks)), tis_cap)
        else:
            v = 0.0
            for j in toks:
                w = np.exp(lp[r, j] - old[r, j])
                vj = -min(w * adv[r, j], np.clip(w, 1 - eps, 1 + eh) * adv[r, j])
                if tis_cap is not None:
                    vj *= min(np.exp(old[r, j] - sample[r, j]), tis_cap)
                v += vj
        per.append(v)
    return float(np.mean(per))


def kto(pi, ref, labels, *, beta=0.1, wd=1.0, wu=1.0):
    """pi, ref [2n] (labelled rows, then mismatched rows), labels [n]."""
    pi, ref = np.asarray(pi, np.float64), np.asarray(ref, np.float64)
    n = len(pi) // 2
    z = max(0.0, float(np.mean(pi[n:] - ref[n:])))
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    losses = []
    for i in range(n):
        r = pi[i] - ref[i]
        losses.append(wd * (1 - sig(beta * (r - z))) if labels[i] else
                      wu * (1 - sig(beta * (z - r))))
    return float(np.mean(losses))
