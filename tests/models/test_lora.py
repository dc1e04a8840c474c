"""LoRA adapters: zero-delta start, adapters off = the base, merged = adapted (here and in HF
torch), gradients only on (and exact for) the adapters, the optimizer state of the adapters
alone, and the PEFT folder loaded by `peft` with the same logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from prefjax.lm import policy_out
from prefjax.models import lora
from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.hf import save_hf
from prefjax.models.llama import Llama, LlamaConfig
from prefjax.pipeline.lora_export import save_peft
from prefjax.pipeline.models import base_reference_forward
from prefjax.train.state import create_train_state

IDS = (np.arange(14).reshape(2, 7) * 7) % 50
TARGETS = {"llama": ("q", "v", "down"), "gpt2": ("q", "v", "proj")}


def base_model(kind: str, scan: bool, **kw) -> nnx.Module:
    if kind == "llama":  # Qwen2-shaped: q/k/v biases
        cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2,
                          num_heads=4, num_kv_heads=2, model_type="qwen2", qkv_bias=True,
                          scan_layers=scan)
        return Llama(cfg, rngs=nnx.Rngs(0), **kw)
    cfg = GPT2Config(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, scan_layers=scan)
    return GPT2(cfg, rngs=nnx.Rngs(0), **kw)


def trained(model: nnx.Module, spec: lora.LoRASpec, seed: int = 3) -> nnx.Module:
    """`model` with adapters whose A and B are both random (a delta as after training)."""
    out = lora.add_adapters(model, spec, nnx.Rngs(1))
    st = lora.adapter_state(out)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(st))))
    nnx.update(out, jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape,
                                                                   x.dtype), st))
    return out


CASES = [(k, s) for k in ("llama", "gpt2") for s in (False, True)]
# jitted: op-by-op dispatch of the tiny models is the slow part on a loaded CPU
logits = nnx.jit(lambda model: model(IDS))
logps = nnx.jit(lambda model, batch: policy_out(model, batch).logps)


@pytest.mark.parametrize("kind,scan", CASES)
def test_zero_b_start_equals_base_and_adapters_off_is_the_base(kind, scan):
    model = base_model(kind, scan)
    base = np.asarray(logits(model))
    fresh = lora.add_adapters(model, lora.LoRASpec(rank=4), nnx.Rngs(1))
    assert len(lora.adapters(fresh)) == (1 if scan else 2) * (7 if kind == "llama" else 6)
    assert not lora.has_adapters(model)  # add_adapters leaves its input alone
    np.testing.assert_array_equal(np.asarray(logits(fresh)), base)
    adapted = trained(model, lora.LoRASpec(rank=4, targets=TARGETS[kind]))
    assert np.abs(np.asarray(logits(adapted)) - base).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(logits(lora.adapters_off(adapted))), base)
    assert all(a.enabled for _, a in lora.adapters(adapted))  # the view, not the model, is off


@pytest.mark.parametrize("kind,scan", CASES)
def test_merged_weights_give_the_adapted_logits(kind, scan):
    for spec in (lora.LoRASpec(rank=4, alpha=8.0, targets=TARGETS[kind]),
                 lora.LoRASpec(rank=3, alpha=5.0, rslora=True)):
        adapted = trained(base_model(kind, scan), spec)
        merged = lora.merge_adapters(adapted)
        assert not lora.has_adapters(merged) and lora.has_adapters(adapted)
        np.testing.assert_allclose(np.asarray(logits(merged)), np.asarray(logits(adapted)),
                                   atol=1e-5, rtol=1e-5)


def test_lora_dense_gradients_match_closed_form_and_finite_differences():
    """y = x W + b + s x A B: dL/dA = s x^T (g B^T), dL/dB = s (x A)^T g for L = <y, g>;
    W and b get none (they are not LoRAParams), in float64."""
    with jax.enable_x64(True):
        model = base_model("llama", False, dtype=jnp.float64, param_dtype=jnp.float64)
        layer = trained(model, lora.LoRASpec(rank=3, alpha=6.0, targets=("q",))).layers[0].attn.q
        x = np.random.default_rng(0).normal(size=(5, 16))
        g = np.random.default_rng(1).normal(size=(5, 16))
        graphdef, params, rest = nnx.split(layer, lora.LoRAParam, ...)
        assert set(params.to_pure_dict()) == {"lora_a", "lora_b"}

        def f(p):
            return jnp.sum(nnx.merge(graphdef, p, rest)(x) * g)

        grads = jax.grad(f)(params).to_pure_dict()
        a, b = (np.asarray(layer.lora_a.get_value()), np.asarray(layer.lora_b.get_value()))
        s = 6.0 / 3
        np.testing.assert_allclose(grads["lora_a"], s * x.T @ (g @ b.T), rtol=1e-12)
        np.testing.assert_allclose(grads["lora_b"], s * (x @ a).T @ g, rtol=1e-12)
        d = jax.tree.map(lambda v: np.random.default_rng(2).normal(size=v.shape), params)
        eps = 1e-6
        fd = (f(jax.tree.map(lambda p, v: p + eps * v, params, d))
              - f(jax.tree.map(lambda p, v: p - eps * v, params, d))) / (2 * eps)
        an = sum(np.vdot(u, v) for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
        np.testing.assert_allclose(fd, an, rtol=1e-8)


@pytest.mark.parametrize("scan", [False, True])
def test_whole_model_gradient_matches_finite_differences(scan):
    """Directional derivative of a float64 model's hidden states w.r.t. all adapters (the
    attention softmax runs in float32, hence the tolerance)."""
    with jax.enable_x64(True):
        model = base_model("llama", scan, dtype=jnp.float64, param_dtype=jnp.float64)
        adapted = trained(model, lora.LoRASpec(rank=2))
        graphdef, params, rest = nnx.split(adapted, lora.LoRAParam, ...)
        r = np.random.default_rng(0).normal(size=(2, 7, 16))
        # token ids as an explicit int32 device array: from int64 NumPy ids, jax 0.10 under
        # enable_x64 reuses an int64 `take` executable for an int32 buffer (RuntimeProgramInput
        # Mismatch) once an earlier test has compiled it
        ids = jnp.asarray(IDS, jnp.int32)

        def f(p):
            return jnp.sum(nnx.merge(graphdef, p, rest).hidden_states(ids)[0] * r)

        grads = jax.grad(f)(params)
        d = jax.tree.map(lambda v: np.random.default_rng(1).normal(size=v.shape), params)
        eps = 1e-5
        fd = (f(jax.tree.map(lambda p, v: p + eps * v, params, d))
              - f(jax.tree.map(lambda p, v: p - eps * v, params, d))) / (2 * eps)
        an = sum(np.vdot(u, v) for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
        np.testing.assert_allclose(fd, an, rtol=5e-3)


@pytest.mark.parametrize("scan", [False, True])
def test_train_state_trains_and_holds_optimizer_state_for_adapters_only(scan):
    from prefjax.train.step import build_train_step

    spec = lora.LoRASpec(rank=4)

    def make(rngs):
        return lora.add_adapters(base_model("llama", scan), spec, nnx.Rngs(1))

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    opt = optax.adam(1e-2)
    state, shardings = create_train_state(make, opt, mesh=mesh, trainable=lora.TRAINABLE)
    assert {p[-1] for p in _paths(state.params)} == {"lora_a", "lora_b"}
    assert not any(p[-1].startswith("lora") for p in _paths(state.rest))
    moments = [p for p in _paths(state.opt_state) if p[-1] not in ("count",)]
    assert moments and all(p[-1] in ("lora_a", "lora_b") for p in moments)
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_moment = sum(x.size for x in jax.tree.leaves(state.opt_state)) - 1  # adam's count
    assert n_moment == 2 * n_adapter

    def loss(out, batch):
        return -jnp.mean(out.logps), {}

    step = build_train_step(loss, opt, mesh=mesh, state_shardings=shardings, donate=False)
    batch = {"input_ids": jnp.asarray(IDS, jnp.int32),
             "attention_mask": jnp.ones(IDS.shape, jnp.int32)}
    new, metrics = step(state, batch)
    assert float(metrics["grad_norm"]) > 0
    jax.tree.map(np.testing.assert_array_equal, new.rest, state.rest)  # the base never moves
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         new.params, state.params)
    assert any(jax.tree.leaves(moved))


def test_sharded_lora_step_equals_the_single_device_step():
    """One LoRA train step of a scanned model on a (data 2, fsdp 2, tensor 2) mesh of simulated
    devices gives the adapters and metrics of the one-device step."""
    from prefjax.train.step import build_train_step

    spec, opt = lora.LoRASpec(rank=4), optax.adam(1e-2)

    def make(rngs):
        return lora.add_adapters(base_model("llama", True), spec, nnx.Rngs(1))

    def loss(out, batch):
        return -jnp.mean(out.logps), {}

    ids = np.concatenate([IDS, IDS[::-1] + 1])  # 4 rows: one per data x fsdp shard
    batch = {"input_ids": jnp.asarray(ids, jnp.int32),
             "attention_mask": jnp.ones(ids.shape, jnp.int32)}
    got = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
        mesh = Mesh(devices, ("data", "fsdp", "tensor"))
        state, shardings = create_train_state(make, opt, mesh=mesh, trainable=lora.TRAINABLE)
        new, metrics = build_train_step(loss, opt, mesh=mesh, state_shardings=shardings)(
            state, batch)
        got.append(jax.device_get((new.params.to_pure_dict(), metrics)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *got)


def _paths(tree) -> list[tuple]:
    """Key paths of the array leaves of `tree` (a Variable's own "value" key dropped)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        out.append(keys[:-1] if keys and keys[-1] == "value" else keys)
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_base_reference_forward_gives_the_base_models_logps(scan):
    model = base_model("llama", scan)
    adapted = trained(model, lora.LoRASpec(rank=4))
    mask = np.ones(IDS.shape, np.int32)
    mask[1, :2] = 0  # left padding on one row
    batch = {"input_ids": jnp.asarray(IDS), "attention_mask": jnp.asarray(mask)}
    out, extra = nnx.jit(base_reference_forward())(adapted, batch)
    np.testing.assert_allclose(np.asarray(extra["ref_logps"]), np.asarray(logps(model, batch)),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(logps(adapted, batch)),
                               rtol=1e-6)
    assert np.abs(np.asarray(out.logps - extra["ref_logps"])).max() > 1e-3


def _torch_logits(folder, ids, adapter=None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder)
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize("kind,scan", CASES)
def test_merged_export_loads_in_transformers_with_the_adapted_logits(kind, scan, tmp_path):
    adapted = trained(base_model(kind, scan), lora.LoRASpec(rank=4, targets=TARGETS[kind]))
    save_hf(lora.merge_adapters(adapted), tmp_path / "merged")
    np.testing.assert_allclose(_torch_logits(tmp_path / "merged", IDS),
                               np.asarray(logits(adapted)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,scan", CASES)
def test_peft_adapter_folder_loads_in_peft_with_the_adapted_logits(kind, scan, tmp_path):
    import peft  # noqa: F401  (a test dependency, setup.cfg [test])
    model = base_model(kind, scan)
    # GPT-2: q and v share the fused c_attn, which gets one rank-2r adapter
    adapted = trained(model, lora.LoRASpec(rank=4, alpha=8.0, targets=TARGETS[kind]))
    save_hf(model, tmp_path / "base")
    save_peft(adapted, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    got = _torch_logits(tmp_path / "base", IDS, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(got, np.asarray(logits(adapted)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_folder_layout_follows_peft_names_and_shapes(kind, tmp_path):
    """What PeftModel.save_pretrained writes (checked without peft): lora_A [r, in] and
    lora_B [out, r] under base_model.model.<HF module>, and the config's LoRA fields."""
    import json

    from safetensors.numpy import load_file

    adapted = trained(base_model(kind, False), lora.LoRASpec(rank=4, alpha=8.0,
                                                             targets=TARGETS[kind]))
    save_peft(adapted, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    t = load_file(tmp_path / "adapter_model.safetensors")
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    if kind == "llama":
        assert cfg["target_modules"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
        p = "base_model.model.model.layers.1."
        assert t[p + "self_attn.v_proj.lora_A.weight"].shape == (4, 16)
        assert t[p + "self_attn.v_proj.lora_B.weight"].shape == (8, 4)  # 2 kv heads x 4
        assert t[p + "mlp.down_proj.lora_A.weight"].shape == (4, 32)
        assert len(t) == 2 * 3 * 2
    else:
        assert cfg["target_modules"] == ["attn.c_attn", "mlp.c_proj"]  # not attn.c_proj
        assert cfg["rank_pattern"] == {"attn.c_attn": 8}
        assert cfg["alpha_pattern"] == {"attn.c_attn": 16.0}  # the same scale 8 / 4
        b = t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert b.shape == (48, 8) and not b[16:32].any()  # no k adapter: its rows are zero


def test_spec_and_targets_fail_with_names():
    assert lora.LoRASpec(rank=4, alpha=8.0).scale == 2.0
    assert lora.LoRASpec(rank=4, alpha=8.0, rslora=True).scale == 4.0
    with pytest.raises(ValueError, match="lora.rank"):
        lora.LoRASpec(rank=0)
    with pytest.raises(ValueError, match="lora.alpha"):
        lora.LoRASpec(rank=2, alpha=0.0)
    with pytest.raises(ValueError, match=r"\['gate'\] name no projection.*'fc'"):
        lora.add_adapters(base_model("gpt2", False), lora.LoRASpec(rank=2, targets=("gate",)),
                          nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a prefjax decoder"):
        lora.add_adapters(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), lora.LoRASpec(rank=2),
                          nnx.Rngs(0))
