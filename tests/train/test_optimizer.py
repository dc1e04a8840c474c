"""`make_optimizer`: plain SGD unless `train.momentum` says otherwise (torch.optim.SGD as the
reference), AdamW's weight-decay mask equal to HF Trainer's choice of decayed parameters, and
fields that an optimizer would ignore refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from prefjax.config import base_config
from prefjax.models import gpt2 as G
from prefjax.models import llama as L
from prefjax.train.build import decays, make_optimizer, weight_decay_mask
from tests.models.hf_fixtures import hf_config


def train_config(**kw):
    t = base_config().train
    t.update(lr=0.1, warmup_steps=0, schedule="constant", **kw)
    return t


def run_optax(t, p0: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    opt = make_optimizer(t)
    p = jnp.asarray(p0)
    s = opt.init(p)
    for g in grads:
        u, s = opt.update(jnp.asarray(g), s, p)
        p = p + u
    return np.asarray(p)


def run_torch_sgd(p0: np.ndarray, grads: list[np.ndarray], lr: float, momentum: float):
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("momentum", [None, 0.0, 0.9])
def test_sgd_matches_torch_sgd_with_the_configured_momentum(momentum):
    r = np.random.default_rng(0)
    p0 = r.normal(size=16).astype(np.float32)
    grads = [r.normal(size=16).astype(np.float32) for _ in range(4)]
    t = train_config(optimizer="sgd")
    assert t.momentum == 0.0  # the default is plain SGD (torch.optim.SGD, optax.sgd)
    if momentum is not None:
        t.momentum = momentum
    got = run_optax(t, p0, grads)
    want = run_torch_sgd(p0, grads, 0.1, momentum or 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if not momentum:  # b1 = 0.9 must not leak in as heavy-ball momentum
        heavy = run_torch_sgd(p0, grads, 0.1, 0.9)
        assert np.abs(got - heavy).max() > 1e-2


def test_fields_an_optimizer_would_ignore_are_refused():
    with pytest.raises(ValueError, match="train.momentum=0.9 is read only by"):
        make_optimizer(train_config(optimizer="adamw", momentum=0.9))
    with pytest.raises(ValueError, match="train.weight_decay=0.1 is applied only by"):
        make_optimizer(train_config(optimizer="sgd", weight_decay=0.1))
    with pytest.raises(ValueError, match="train.weight_decay_mask must be one of"):
        make_optimizer(train_config(weight_decay=0.1, weight_decay_mask="none"))
    with pytest.raises(ValueError, match=r"train.momentum must be in \[0, 1\)"):
        make_optimizer(train_config(optimizer="sgd", momentum=1.0))


# ---- AdamW weight-decay mask vs HF Trainer ----------------------------------------------------

def prefjax_model(kind: str, scan: bool):
    cfg = hf_config(kind)
    if kind == "gpt2":
        c = G.config_from_hf(cfg.to_dict())
        c = type(c)(**{**c.__dict__, "scan_layers": scan})
        return cfg, G.GPT2(c, rngs=nnx.Rngs(0)), G.params_to_hf
    c = L.config_from_hf(cfg.to_dict())
    c = type(c)(**{**c.__dict__, "scan_layers": scan})
    return cfg, L.Llama(c, rngs=nnx.Rngs(0)), L.params_to_hf


def hf_decayed(cfg) -> tuple[set[str], set[str]]:
    """(all parameter names, the decayed ones) by HF Trainer's own rule on the torch model."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(cfg)
    names = {n for n, _ in model.named_parameters()}
    # unbound: the rule reads only the model (no Trainer, no accelerate needed)
    return names, set(transformers.Trainer.get_decay_parameter_names(None, model))


@pytest.mark.parametrize("kind,scan", [("gpt2", False), ("gpt2", True), ("qwen2", False),
                                       ("qwen2", True), ("qwen2_tied", False), ("llama", False)])
def test_hf_mask_decays_what_hf_trainer_decays(kind, scan):
    cfg, model, to_hf = prefjax_model(kind, scan)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    # every prefjax leaf becomes the constant i + 1: the exported HF tensors say which leaves each
    # HF parameter came from (GPT-2's fused c_attn holds three)
    marked = jax.tree_util.tree_unflatten(
        treedef, [jnp.full(x.shape, i + 1, jnp.float32) for i, (_, x) in enumerate(leaves)])
    mask = jax.tree.leaves(weight_decay_mask(params))
    assert mask == [decays(path) for path, _ in leaves]
    names, want = hf_decayed(cfg)
    got = set()
    for name, x in to_hf(marked, model.config).items():
        decisions = {mask[int(m) - 1] for m in np.unique(np.asarray(x))}
        assert len(decisions) == 1, name
        if decisions.pop():
            got.add(name)
    seen = set(to_hf(marked, model.config))
    assert seen ^ names <= {"lm_head.weight"}, seen ^ names  # tied heads: one side names it
    assert got == want & seen
    assert any("embed" in n or "wte" in n for n in got)  # embeddings are decayed, as in HF
    assert not any("bias" in n or "norm" in n or ".ln_" in n for n in got)
    assert any("bias" in n for n in seen) == (kind != "llama")  # qwen2 / gpt2 have biases


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["hf", "all"])
def test_adamw_decays_only_masked_leaves(moment_dtype, mask):
    """Zero gradients make Adam's own step exactly 0, so the update is the decay alone:
    -lr * wd * p on decayed leaves, 0 elsewhere."""
    cfg, model, _ = prefjax_model("gpt2", False)
    params = nnx.state(model, nnx.Param)
    t = train_config(weight_decay=0.5, weight_decay_mask=mask, moment_dtype=moment_dtype)
    opt = make_optimizer(t)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    for (path, u), (_, p) in zip(jax.tree_util.tree_leaves_with_path(updates),
                                 jax.tree_util.tree_leaves_with_path(params), strict=True):
        want = -0.1 * 0.5 * np.asarray(p) if mask == "all" or decays(path) else 0 * np.asarray(p)
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, atol=1e-8,
                                   err_msg=jax.tree_util.keystr(path))
    del cfg


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_mask_leaves_the_state_layout_alone(moment_dtype):
    """Checkpoints written before the mask existed (or with mask "all") restore into it."""
    p = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    trees = [make_optimizer(train_config(weight_decay=0.1, weight_decay_mask=m,
                                         moment_dtype=moment_dtype)).init(p)
             for m in ("hf", "all")]
    assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
