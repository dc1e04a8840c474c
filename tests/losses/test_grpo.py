"""GRPO family (GRPO, Dr. GRPO, DAPO/BNPO, GSPO, TIS) vs float64 NumPy: advantages, loss values,
gradients (central differences of the NumPy loss), limiting cases, padding, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.losses.grpo import grpo_batch
from prefjax.typing import PolicyOut
from tests.losses import reference_np as ref_np
from tests.losses import reference_np_pg as np_pg

RTOL, ATOL = 1e-5, 1e-6
K, B, T = 4, 3, 9  # samples per prompt, prompts, columns


def rollout(seed, k=K, b=B, t=T, empty_row=False):
    """k*b rows (sample-major) of prompt (mask 0), response (mask 1), right padding (mask 0)."""
    r = np.random.default_rng(seed)
    n = k * b
    mask = np.zeros((n, t), np.float32)
    for i in range(n):
        start = r.integers(1, 4)
        mask[i, start:start + r.integers(1, t - start + 1)] = 1
    if empty_row:
        mask[-1] = 0
    f = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    lp = (-np.abs(f(n, t)) - 0.5) * mask
    return dict(mask=mask, logps=lp, old=(lp + 0.15 * f(n, t)) * mask,
                ref=(lp + 0.3 * f(n, t)) * mask, sample=(lp + 0.15 * f(n, t) + 0.05) * mask,
                rewards=np.round(f(n), 1), adv=f(n), k=k)


def call(d, logps=None, **hp):
    lp = jnp.asarray(d["logps"] if logps is None else logps)
    m = jnp.asarray(d["mask"])
    out = PolicyOut(lp, jnp.sum(lp * m, -1), m.sum(-1))
    batch = {"loss_mask": m, "old_token_logps": jnp.asarray(d["old"]),
             "advantages": jnp.asarray(d["adv"]), "ref_token_logps": jnp.asarray(d["ref"]),
             "sample_token_logps": jnp.asarray(d["sample"])}
    return losses.get("grpo", **hp)(out, batch)


def np_call(d, logps=None, **hp):
    kw = dict(loss_type=hp.get("loss_type", "dapo"), eps=hp.get("epsilon", 0.2),
              eps_high=hp.get("epsilon_high"), beta=hp.get("beta", 0.0), ref=d["ref"],
              level=hp.get("importance_sampling_level", "token"),
              max_len=hp.get("max_completion_length", 0), tis_cap=hp.get("tis_cap"),
              sample=d["sample"])
    return np_pg.grpo(d["logps"] if logps is None else logps, d["old"], d["adv"], d["mask"],
                      **kw)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_group_advantages_match_numpy(scale, k):
    d = rollout(0, k=k)
    adv, flat = losses.group_advantages(jnp.asarray(d["rewards"]), k, scale_rewards=scale)
    np.testing.assert_allclose(adv, np_pg.group_advantages(d["rewards"], k, scale), rtol=RTOL,
                               atol=ATOL)
    groups = np_pg.group_of(len(d["rewards"]), k)
    want_flat = np.zeros(len(d["rewards"]), bool)
    for g in groups:
        want_flat[g] = len(set(d["rewards"][g].tolist())) == 1
    np.testing.assert_array_equal(flat, want_flat)


def test_one_sample_per_prompt_has_zero_advantage():
    for scale in ("group", "batch", "none"):
        adv, flat = losses.group_advantages(jnp.asarray([0.3, -1.0, 2.0]), 1, scale_rewards=scale)
        np.testing.assert_array_equal(adv, 0.0)
        assert bool(jnp.all(flat))


CASES = [
    dict(),
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo", max_completion_length=6),
    dict(loss_type="dr_grpo"),
    dict(epsilon=0.1, epsilon_high=0.28),
    dict(beta=0.04),
    dict(beta=0.1, loss_type="grpo", importance_sampling_level="sequence"),
    dict(importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.08),
    dict(tis_cap=1.05),
    dict(tis_cap=2.0, beta=0.02, loss_type="grpo"),
]


@pytest.mark.parametrize("hp", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or
                                           "defaults" for c in CASES])
@pytest.mark.parametrize("empty_row", [False, True])
def test_loss_and_gradient_match_numpy(hp, empty_row):
    d = rollout(1, empty_row=empty_row)
    loss, metrics = call(d, **hp)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np_call(d, **hp), rtol=RTOL, atol=ATOL)
    assert np.isfinite(float(metrics["clip_ratio/region_mean"]))
    with jax.enable_x64(True):
        g = jax.grad(lambda lp: call(d, logps=lp, **hp)[0])(jnp.asarray(d["logps"], jnp.float64))
    fd = ref_np.central_diff(lambda x: np_call(d, logps=x.reshape(d["mask"].shape), **hp),
                             d["logps"].astype(np.float64).ravel()).reshape(d["mask"].shape)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_clip_branches_are_exercised_and_measured():
    d = rollout(2)
    _, m = call(d, epsilon=0.05, epsilon_high=0.1)
    lp, old, adv, mask = d["logps"], d["old"], d["adv"], d["mask"] > 0
    w = np.exp(lp.astype(np.float64) - old)
    a = np.broadcast_to(adv[:, None], w.shape)
    low = ((w < 0.95) & (a < 0))[mask].mean()
    high = ((w > 1.1) & (a > 0))[mask].mean()
    np.testing.assert_allclose(m["clip_ratio/low_mean"], low, rtol=RTOL)
    np.testing.assert_allclose(m["clip_ratio/high_mean"], high, rtol=RTOL)
    assert 0 < low and 0 < high


def test_gspo_equals_grpo_when_every_response_has_one_token():
    d = rollout(3)
    mask = np.zeros_like(d["mask"])
    mask[np.arange(len(mask)), np.random.default_rng(0).integers(1, T, len(mask))] = 1
    d = {**d, "mask": mask, "logps": d["logps"] * 0 + mask * -1.3 + 0.2 * d["adv"][:, None],
         "old": d["old"] * mask, "ref": d["ref"] * mask, "sample": d["sample"] * mask}
    for lt in ("grpo", "dapo", "dr_grpo"):
        token = call(d, loss_type=lt, beta=0.05)
        seq = call(d, loss_type=lt, beta=0.05, importance_sampling_level="sequence")
        np.testing.assert_allclose(seq[0], token[0], rtol=1e-6)
        gt = jax.grad(lambda lp, lt=lt: call(d, logps=lp, loss_type=lt)[0])(jnp.asarray(d["logps"]))
        gs = jax.grad(lambda lp, lt=lt: call(d, logps=lp, loss_type=lt,
                                      importance_sampling_level="sequence")[0])(
            jnp.asarray(d["logps"]))
        np.testing.assert_allclose(gs, gt, rtol=1e-6, atol=1e-9)


def test_ratio_one_is_the_policy_gradient_of_the_advantage():
    """pi = pi_old, beta 0: d L / d log pi_t = -A / (tokens in the batch) (dapo)."""
    d = rollout(4)
    d["old"] = d["logps"]
    g = jax.grad(lambda lp: call(d, logps=lp)[0])(jnp.asarray(d["logps"]))
    want = -d["adv"][:, None] * d["mask"] / d["mask"].sum()
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-9)


def test_tis_without_mismatch_changes_nothing():
    d = rollout(5)
    d["sample"] = d["old"]
    for hp in (dict(), dict(loss_type="grpo", beta=0.1)):
        np.testing.assert_allclose(call(d, tis_cap=2.0, **hp)[0], call(d, **hp)[0], rtol=1e-6)


def test_padding_garbage_changes_nothing():
    d = rollout(6)
    base = call(d, beta=0.1, tis_cap=2.0, loss_type="grpo")[0]
    pad = {}
    for key, v in d.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            junk = np.full((v.shape[0], 3), 0.0 if key == "mask" else np.nan, np.float32)
            if key == "logps":
                junk[:, 0] = np.inf
            pad[key] = np.concatenate([v, junk], axis=1)
        else:
            pad[key] = v
    np.testing.assert_allclose(call(pad, beta=0.1, tis_cap=2.0, loss_type="grpo")[0], base,
                               rtol=1e-6)
    g = jax.grad(lambda lp: call(pad, logps=lp, beta=0.1, loss_type="grpo")[0])(
        jnp.asarray(pad["logps"]))
    assert np.all(np.isfinite(g)) and np.all(g[:, T:] == 0)


def test_rollout_batch_builder_groups_and_dynamic_sampling():
    from prefjax.pipeline.rollouts import Settings

    d = rollout(7)
    rewards = d["rewards"].copy()
    groups = np_pg.group_of(len(rewards), K)
    rewards[groups[1]] = 0.5  # one group with all-equal rewards
    m = jnp.asarray(d["mask"])
    rows = {"input_ids": jnp.zeros(m.shape, jnp.int32), "attention_mask": m, "loss_mask": m,
            "sample_token_logps": jnp.asarray(d["sample"])}
    out = PolicyOut(jnp.asarray(d["old"]), jnp.zeros(len(m)), m.sum(-1))
    ref = PolicyOut(jnp.asarray(d["ref"]), jnp.zeros(len(m)), m.sum(-1))
    for dyn in (False, True):
        o = Settings(num_generations=K, scale_rewards="group", dynamic_sampling=dyn)
        batch = grpo_batch(rows, out, ref, jnp.asarray(rewards), o)
        np.testing.assert_allclose(batch["advantages"], np_pg.group_advantages(rewards, K),
                                   rtol=RTOL, atol=ATOL)
        kept = np.asarray(batch["loss_mask"]).any(-1)
        assert kept[groups[1]].any() != dyn and kept[groups[0]].all()
        np.testing.assert_array_equal(batch["old_token_logps"], d["old"])
        np.testing.assert_array_equal(batch["sample_token_logps"], d["sample"])


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(epsilon=1.5), "epsilon"),
    (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(beta=-1.0), "beta"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(tis_cap=0.5), "tis_cap"),
    (dict(max_completion_length=-1), "max_completion_length"),
])
def test_bad_hyperparameters_fail_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        losses.get("grpo", **bad)


def test_missing_batch_keys_fail_clearly():
    d = rollout(8)
    lp = jnp.asarray(d["logps"])
    out = PolicyOut(lp, lp.sum(-1), jnp.ones(len(lp)))
    base = {"loss_mask": jnp.asarray(d["mask"]), "old_token_logps": jnp.asarray(d["old"]),
            "advantages": jnp.asarray(d["adv"])}
    with pytest.raises(ValueError, match="ref_token_logps"):
        losses.get("grpo", beta=0.1)(out, base)
    with pytest.raises(ValueError, match="sample_token_logps"):
        losses.get("grpo", tis_cap=2.0)(out, base)
    with pytest.raises(ValueError, match="advantages"):
        losses.get("grpo")(out, {k: v for k, v in base.items() if k != "advantages"})
