"""Float64 NumPy re-derivations of every loss, written from ALGORITHMS.md (not from prefjax code).

Loops over pairs / tokens are used where they make the formula plainer than vectorised code.
"""

from __future__ import annotations

import math

import numpy as np


def sig(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def logsig(z):
    return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def central_diff(f, x, eps=1e-6):
    """Gradient of scalar f at float64 vector x by central differences."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        g.flat[i] = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
    return g


# --- SFT and reward model -------------------------------------------------------------------

def sft(token_logps, mask, reduction="token_mean"):
    tl, m = np.asarray(token_logps, np.float64), np.asarray(mask) > 0
    per_row = [-sum(tl[i, j] for j in range(tl.shape[1]) if m[i, j]) for i in range(tl.shape[0])]
    if reduction == "token_mean":
        return sum(per_row) / m.sum()
    return float(np.mean(per_row))


def bradley_terry(scores, margin=None, center_coef=0.0):
    s = np.asarray(scores, np.float64)
    n = len(s) // 2
    rw, rl = s[:n], s[n:]
    mg = np.zeros(n) if margin is None else np.asarray(margin, np.float64)
    loss = np.mean(-np.log(sig(rw - rl - mg)))
    return loss + center_coef * np.mean((rw + rl) ** 2)


# --- DPO family (ALGORITHMS.md sections 1, 2, 6) ------------------------------------------------

def dpo(pi, ref, lengths, *, beta, loss_type="sigmoid", eps=0.0, ipo_average=True, tau=0.05):
    """pi, ref, lengths [2n] (chosen first). Returns the batch loss."""
    pi, ref, ln = (np.asarray(a, np.float64) for a in (pi, ref, lengths))
    n = len(pi) // 2
    rw, rl = pi[:n] - ref[:n], pi[n:] - ref[n:]
    h = rw - rl
    hbar = rw / ln[:n] - rl / ln[n:]
    z = beta * h
    ls_pos, ls_neg = logsig(z), logsig(-z)
    if loss_type == "sigmoid":
        per = -(1 - eps) * ls_pos - eps * ls_neg
    elif loss_type == "hinge":
        per = np.maximum(0.0, 1.0 - z)
    elif loss_type == "ipo":
        per = ((hbar if ipo_average else h) - 1.0 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        per = sig(z) * (ls_pos - math.log(1 - eps)) + sig(-z) * (ls_neg - math.log(eps))
    elif loss_type == "nca_pair":
        per = -logsig(beta * rw) - 0.5 * logsig(-beta * rw) - 0.5 * logsig(-beta * rl)
    elif loss_type == "robust":
        per = (-(1 - eps) * ls_pos + eps * ls_neg) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        per = -logsig(beta * rw) - logsig(-beta * rl)
    elif loss_type == "sppo_hard":
        per = (rw - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = np.sort(pi[:n] - pi[n:]) - np.sort(ref[:n] - ref[n:])
        else:
            delta = np.sort(rw) - np.sort(rl)
        per = -(1 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
    elif loss_type == "apo_zero":
        per = 1 - sig(beta * rw) + sig(beta * rl)
    elif loss_type == "apo_down":
        per = sig(beta * rw) + 1 - sig(z)
    elif loss_type == "discopop":
        m = sig(z / tau)
        per = (1 - m) * -ls_pos + m * np.exp(-z)
    elif loss_type == "sft":
        return -pi[:n].sum() / ln[:n].sum()
    elif loss_type == "sigmoid_norm":
        per = -logsig(beta * hbar)
    else:
        raise KeyError(loss_type)
    return float(np.mean(per))


def dpo_metrics(pi, ref, beta):
    pi, ref = np.asarray(pi, np.float64), np.asarray(ref, np.float64)
    n = len(pi) // 2
    cw, cl = beta * (pi[:n] - ref[:n]), beta * (pi[n:] - ref[n:])
    return {"rewards/chosen": cw.mean(), "rewards/rejected": cl.mean(),
            "rewards/accuracies": np.mean(cw > cl), "rewards/margins": np.mean(cw - cl),
            "logps/chosen": pi[:n].mean(), "logps/rejected": pi[n:].mean()}


def simpo(pi, lengths, *, beta, gamma, eps=0.0, alpha=0.0):
    pi, ln = np.asarray(pi, np.float64), np.asarray(lengths, np.float64)
    n = len(pi) // 2
    u = beta * (pi[:n] / ln[:n] - pi[n:] / ln[n:]) - gamma
    loss = np.mean(-(1 - eps) * logsig(u) - eps * logsig(-u))
    return loss + alpha * (-pi[:n].sum() / ln[:n].sum())


def cpo(pi, lengths, *, beta, alpha, eps=0.0):
    pi, ln = np.asarray(pi, np.float64), np.asarray(lengths, np.float64)
    n = len(pi) // 2
    u = beta * (pi[:n] - pi[n:])
    return np.mean(-(1 - eps) * logsig(u) - eps * logsig(-u)) - alpha * pi[:n].sum() / ln[:n].sum()


def orpo(pi, lengths, *, beta):
    pi, ln = np.asarray(pi, np.float64), np.asarray(lengths, np.float64)
    n = len(pi) // 2
    p = np.exp(pi / ln)  # P = exp(mean token log-prob)
    odds = p / (1 - p)
    log_or = np.log(odds[:n]) - np.log(odds[n:])
    nll = -pi[:n].sum() / ln[:n].sum()
    return nll - beta * np.mean(np.log(sig(log_or)))


# --- MPO (section 3) ---------------------------------------------------------------------------

def mpo(pi_pair, ref_pair, ref_sample_logps, ref_sample_lengths, ref_mask, *, beta, alpha,
        direction="policy_ref", uniform=False, average=True):
    """Returns (loss, terms dict). ref_pair may be None when uniform or beta unused."""
    pi = np.asarray(pi_pair, np.float64)
    n = len(pi) // 2
    p = sig(pi[:n] - pi[n:])
    pr = np.full(n, 0.5) if (uniform or ref_pair is None) else sig(
        np.asarray(ref_pair, np.float64)[:n] - np.asarray(ref_pair, np.float64)[n:])

    def kl(a, b):  # KL(Bern(a) || Bern(b))
        return a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))

    kl_pair = np.mean(kl(p, pr) if direction == "policy_ref" else kl(pr, p))
    real = [i for i, f in enumerate(ref_mask) if f > 0]
    nll_sum = -sum(float(ref_sample_logps[i]) for i in real)
    tokens = sum(float(ref_sample_lengths[i]) for i in real)
    per_token = nll_sum / tokens if tokens else 0.0
    ref_nll = per_token if average else (nll_sum / len(real) if real else 0.0)
    terms = {"loss/pref": -np.mean(p), "loss/pair_kl": kl_pair, "loss/ref_nll": ref_nll,
             "mpo/ref_nll_per_token": per_token, "mpo/pref_prob": np.mean(p),
             "rewards/accuracies": np.mean(p > 0.5)}
    return terms["loss/pref"] + beta * kl_pair + alpha * ref_nll, terms


# --- PPO (section 5) ---------------------------------------------------------------------------

def shaped_rewards(scores, logps, ref_logps, mask, *, kl_coef, estimator="k1"):
    b, t = np.shape(logps)
    r = np.zeros((b, t))
    for i in range(b):
        last = None
        for j in range(t):
            if mask[i][j]:
                k1 = float(logps[i][j]) - float(ref_logps[i][j])
                k = (k1 if estimator == "k1" else 0.5 * k1 * k1 if estimator == "k2"
                     else math.exp(-k1) - 1 + k1)
                r[i, j] = -kl_coef * k
                last = j
        if last is not None:
            r[i, last] += float(scores[i])
    return r


def gae(rewards, values, mask, *, gamma, lam):
    b, t = np.shape(rewards)
    adv = np.zeros((b, t))
    for i in range(b):
        pos = [j for j in range(t) if mask[i][j]]
        running = 0.0
        for k in reversed(range(len(pos))):
            j = pos[k]
            v_next = float(values[i][pos[k + 1]]) if k + 1 < len(pos) else 0.0
            delta = float(rewards[i][j]) + gamma * v_next - float(values[i][j])
            running = delta + gamma * lam * running
            adv[i, j] = running
    ret = np.where(np.asarray(mask) > 0, adv + np.asarray(values, np.float64), 0.0)
    return adv, ret


def whiten(x, mask, shift_mean=True):
    x, m = np.asarray(x, np.float64), np.asarray(mask) > 0
    vals = x[m]
    mu, var = vals.mean(), vals.var(ddof=1)
    out = (x - mu) / np.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mu
    return np.where(m, out, 0.0)


def ppo(logps, old_logps, values, old_values, adv, ret, mask, *, eps, eps_v, vf_coef):
    m = np.asarray(mask) > 0
    lp, olp, v, ov, a, r = (np.asarray(x, np.float64)[m]
                            for x in (logps, old_logps, values, old_values, adv, ret))
    rho = np.exp(lp - olp)
    pg1, pg2 = -a * rho, -a * np.clip(rho, 1 - eps, 1 + eps)
    pg = np.mean(np.maximum(pg1, pg2))
    vc = np.clip(v, ov - eps_v, ov + eps_v)
    vf1, vf2 = (v - r) ** 2, (vc - r) ** 2
    vf = 0.5 * np.mean(np.maximum(vf1, vf2))
    metrics = {"loss/policy_avg": pg, "loss/value_avg": vf,
               "policy/approxkl_avg": 0.5 * np.mean((lp - olp) ** 2),
               "policy/clipfrac_avg": np.mean(pg2 > pg1), "val/clipfrac_avg": np.mean(vf2 > vf1),
               "val/ratio": rho.mean(), "val/ratio_var": rho.var()}
    return pg + vf_coef * vf, metrics


# --- P3O (section 4) ---------------------------------------------------------------------------

def p3o(pi, old, ref, rewards, lengths, *, variant, kl_coef, eps, R=10.0, avg_tokenwise=True,
        scale_q=False):
    pi, old, ref, rw, ln = (np.asarray(a, np.float64) for a in (pi, old, ref, rewards, lengths))
    n = len(pi) // 2
    ell = pi - ref
    q = (rw[:n] - rw[n:]) - kl_coef * (ell[:n] - ell[n:])
    if scale_q:
        q = q / (q.std() + 1e-8)
    rho1, rho2 = np.exp(pi[:n] - old[:n]), np.exp(pi[n:] - old[n:])
    if variant == "v1":
        a = q / 2
        t1 = np.minimum(rho1 * a, np.clip(rho1, 1 - eps, 1 + eps) * a)
        t2 = np.minimum(-rho2 * a, -np.clip(rho2, 1 - eps, 1 + eps) * a)
        return -np.mean(t1 + t2)
    if variant == "v2":
        rho = rho1 / rho2
        return -np.mean(np.minimum(rho * q / 2, np.clip(rho, 1 - eps, 1 + eps) * q / 2))
    w = np.clip(rho1 * rho2, 1 / R, R)
    d = ell[:n] - ell[n:]
    d_old = (old[:n] - ref[:n]) - (old[n:] - ref[n:])
    per = np.maximum(-q * w * d, -q * w * np.clip(d, d_old - eps, d_old + eps)) / 2
    return per.sum() / ln.sum() if avg_tokenwise else per.mean()


def p3o_grad(pi, old, ref, rewards, lengths, *, variant, kl_coef, eps, R=10.0,
             avg_tokenwise=True, scale_q=False):
    """Closed-form gradient wrt pi [2n], with q and w held fixed (they are detached)."""
    pi, old, ref, rw, ln = (np.asarray(a, np.float64) for a in (pi, old, ref, rewards, lengths))
    n = len(pi) // 2
    ell = pi - ref
    q = (rw[:n] - rw[n:]) - kl_coef * (ell[:n] - ell[n:])
    if scale_q:
        q = q / (q.std() + 1e-8)
    g = np.zeros(2 * n)
    for i in range(n):
        r1, r2 = math.exp(pi[i] - old[i]), math.exp(pi[n + i] - old[n + i])
        if variant == "v1":
            # d/dpi of -min(rho a, clip(rho) a): -a rho unless the clipped term is strictly smaller
            for j, rho, a in ((i, r1, q[i] / 2), (n + i, r2, -q[i] / 2)):
                inside = 1 - eps <= rho <= 1 + eps
                if inside or rho * a < min(max(rho, 1 - eps), 1 + eps) * a:
                    g[j] = -a * rho / n
        elif variant == "v2":
            rho, a = r1 / r2, q[i] / 2
            if 1 - eps <= rho <= 1 + eps or rho * a < min(max(rho, 1 - eps), 1 + eps) * a:
                g[i], g[n + i] = -a * rho / n, a * rho / n
        else:
            w = min(max(r1 * r2, 1 / R), R)
            d = ell[i] - ell[n + i]
            d_old = (old[i] - ref[i]) - (old[n + i] - ref[n + i])
            inside = d_old - eps <= d <= d_old + eps
            dc = min(max(d, d_old - eps), d_old + eps)
            norm = ln.sum() if avg_tokenwise else n
            if inside or -q[i] * w * d > -q[i] * w * dc:
                g[i], g[n + i] = -q[i] * w / 2 / norm, q[i] * w / 2 / norm
    return g


def p3o_tokenwise(pi, old, ref, rewards, token_logps, old_token_logps, mask, *, kl_coef, eps,
                  R=10.0):
    """clip_tokenwise form of the official loss, token by token."""
    pi, old, ref, rw = (np.asarray(a, np.float64) for a in (pi, old, ref, rewards))
    n = len(pi) // 2
    ell = pi - ref
    total, count = 0.0, 0
    for i in range(n):
        q = (rw[i] - rw[n + i]) - kl_coef * (ell[i] - ell[n + i])
        w = min(max(math.exp(pi[i] - old[i] + pi[n + i] - old[n + i]), 1 / R), R)
        for row, s in ((i, q * w), (n + i, -q * w)):
            for j in range(np.shape(mask)[1]):
                if mask[row][j]:
                    lp, olp = float(token_logps[row][j]), float(old_token_logps[row][j])
                    clipped = min(max(lp, olp - eps), olp + eps)
                    total += max(-s * lp, -s * clipped)
                    count += 1
    return total / count
