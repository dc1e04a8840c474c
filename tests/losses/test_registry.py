"""The registry: names, hyperparameter validation at get() time, and the shared loss contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.typing import PolicyOut

REQUIRED = {"sft", "reward_bt", "dpo", "ipo", "cdpo", "simpo", "orpo", "cpo", "mpo", "ppo", "p3o"}


def test_names_and_partial():
    assert REQUIRED <= set(losses.names())
    fn = losses.get("dpo", beta=0.3)
    assert isinstance(fn, functools.partial) and fn.keywords["beta"] == 0.3
    assert fn.keywords["loss_type"] == "sigmoid"  # defaults are bound too (visible in logs)


@pytest.mark.parametrize("name,hparams,field", [
    ("dpo", {"beta": 0.0}, "beta"),
    ("dpo", {"beta": -1}, "beta"),
    ("dpo", {"beta": True}, "beta"),
    ("dpo", {"label_smoothing": 0.5}, "label_smoothing"),
    ("dpo", {"label_smoothing": -0.1}, "label_smoothing"),
    ("dpo", {"loss_type": "sigmoidd"}, "loss_type"),
    ("dpo", {"loss_type": ["sigmoid", "bogus"]}, "loss_type"),
    ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
    ("dpo", {"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ("dpo", {"loss_type": "exo_pair"}, "label_smoothing"),
    ("dpo", {"reference_free": 1}, "reference_free"),
    ("dpo", {"rpo_alpha": -1.0}, "rpo_alpha"),
    ("dpo", {"betaa": 0.1}, "betaa"),
    ("ipo", {"beta": 0}, "beta"),
    ("ipo", {"average": "yes"}, "average"),
    ("cdpo", {"label_smoothing": 0.7}, "label_smoothing"),
    ("simpo", {"beta": -2.0}, "beta"),
    ("simpo", {"gamma": float("nan")}, "gamma"),
    ("orpo", {"beta": 0.0}, "beta"),
    ("cpo", {"alpha": -1}, "alpha"),
    ("sft", {"reduction": "mean"}, "reduction"),
    ("reward_bt", {"center_coef": -0.1}, "center_coef"),
    ("mpo", {"beta": -0.1}, "beta"),
    ("mpo", {"alpha": -1}, "alpha"),
    ("mpo", {"pair_kl_direction": "forward"}, "pair_kl_direction"),
    ("ppo", {"clip_eps": 0.0}, "clip_eps"),
    ("ppo", {"clip_eps_value": -0.2}, "clip_eps_value"),
    ("ppo", {"vf_coef": -1}, "vf_coef"),
    ("p3o", {"variant": "v3"}, "variant"),
    ("p3o", {"clip_eps": -0.2}, "clip_eps"),
    ("p3o", {"cliprange_ratio": 0.5}, "cliprange_ratio"),
    ("p3o", {"kl_coef": -0.05}, "kl_coef"),
    ("p3o", {"variant": "v2", "clip_tokenwise": True}, "clip_tokenwise"),
])
def test_bad_hyperparameters_fail_at_get(name, hparams, field):
    with pytest.raises(ValueError, match=field) as e:
        losses.get(name, **hparams)
    assert name in str(e.value)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'dop'") as e:
        losses.get("dop")
    assert all(n in str(e.value) for n in REQUIRED)


def test_odd_pairwise_batch_is_rejected():
    out = PolicyOut(jnp.zeros((3, 2)), jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="even number of rows"):
        losses.get("dpo")(out, {"ref_logps": jnp.zeros(3)})
    with pytest.raises(ValueError, match="ref_logps"):
        losses.get("dpo")(PolicyOut(jnp.zeros((4, 2)), jnp.zeros(4), jnp.ones(4)), {})


def _inputs(b=8, t=6, m=2):
    r = np.random.default_rng(0)
    mask = np.ones((b, t), np.int32)
    mask[:, :2] = 0
    tl = jnp.asarray(np.where(mask > 0, -r.uniform(0.1, 2, (b, t)), 0), jnp.float32)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    out = PolicyOut(tl, tl.sum(-1), jnp.asarray(mask.sum(-1), jnp.float32), values=f(b, t),
                    scores=f(b))
    batch = {"loss_mask": jnp.asarray(mask), "ref_logps": out.logps + f(b),
             "old_logps": out.logps + 0.1 * f(b), "rewards": f(b), "old_token_logps": tl,
             "advantages": f(b, t), "returns": f(b, t), "old_values": f(b, t)}
    return out, batch, {"ref_sample_mask": jnp.asarray([1.0] * (m - 1) + [0.0])}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_loss_is_jittable_float32_scalar(name):
    out, batch, extra = _inputs()
    if name == "mpo":
        batch = {**batch, **extra}
    fn = losses.get(name)
    loss, metrics = jax.jit(fn)(out, batch)
    assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(loss)
    assert "loss" in metrics
    for k, v in metrics.items():
        assert v.shape == () and v.dtype == jnp.float32, k
        assert np.isfinite(v), k
    grads = jax.grad(lambda o: fn(o, batch)[0])(out)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
