"""load_hf / save_hf against HF PyTorch: single, sharded and bf16 checkpoints, round trips, and
clear errors for broken or unsupported checkpoint folders."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from prefjax.models import CheckpointError, Llama, LlamaConfig, load_hf, save_hf
from prefjax.models import hf as hfio
from tests.models.hf_fixtures import hf_logits, make_hf_model, make_tiny_checkpoint, padded_batch

REAL = padded_batch()[1].astype(bool)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {k: make_tiny_checkpoint(k, root / k)
            for k in ("llama", "llama3_rope", "qwen2", "qwen2_tied", "mistral")}


def logits(model, ids=None, mask=None):
    if ids is None:
        ids, mask = padded_batch()
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def params(model):
    return nnx.state(model, nnx.Param).to_pure_dict()


def broken_copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["llama", "llama3_rope", "qwen2", "qwen2_tied", "mistral"])
def test_load_hf_matches_hf_logits(kind, ckpts):
    model, tok = load_hf(ckpts[kind])
    ids, mask = padded_batch()
    ref = hf_logits(make_hf_model(kind), ids, mask)
    assert np.abs(logits(model) - ref)[REAL].max() <= 1e-4
    assert isinstance(model, Llama)
    assert model.config.model_type == kind.removesuffix("3_rope").removesuffix("_tied")
    assert tok.decode(tok("Hi there!").input_ids) == "Hi there!"


def test_sharded_checkpoint_loads(tmp_path):
    path = make_tiny_checkpoint("qwen2", tmp_path / "sharded", max_shard_size="40KB")
    assert (path / hfio.INDEX).is_file() and len(list(path.glob("*.safetensors"))) > 2
    assert not (path / "model.safetensors").exists()
    model, _ = load_hf(path, tokenizer=False)
    ids, mask = padded_batch()
    assert np.abs(logits(model) - hf_logits(make_hf_model("qwen2"), ids, mask))[REAL].max() <= 1e-4


def test_bf16_checkpoint_and_param_dtype(tmp_path):
    path = make_tiny_checkpoint("mistral", tmp_path / "bf16", dtype=torch.bfloat16)
    model, _ = load_hf(path, tokenizer=False)
    ref = make_hf_model("mistral").to(torch.bfloat16).float().state_dict()
    got = hfio.architecture("mistral").params_to_hf(params(model), model.config)
    for name, x in got.items():
        np.testing.assert_array_equal(x, ref[name].numpy(), err_msg=name)
    half, _ = load_hf(path, tokenizer=False, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params(half))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("kind", ["llama3_rope", "qwen2_tied", "mistral"])
def test_save_hf_round_trip(kind, ckpts, tmp_path):
    model, tok = load_hf(ckpts[kind])
    out = save_hf(model, tmp_path / "saved", tokenizer=tok)
    again, tok2 = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params(again), params(model))
    assert again.config == model.config
    assert tok2("abc").input_ids == tok("abc").input_ids
    ids, mask = padded_batch()
    assert np.abs(hf_logits(out, ids, mask) - logits(model))[REAL].max() <= 1e-4


def test_save_hf_of_a_fresh_model_loads_in_transformers(tmp_path):
    cfg = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, rope_theta=500.0, rope_type="llama3",
                      rope_factor=4.0, rope_original_max_position_embeddings=32,
                      mlp_bias=True, initializer_range=0.3)
    model = Llama(cfg, rngs=nnx.Rngs(3))
    out = save_hf(model, tmp_path / "fresh")
    ids, mask = padded_batch()
    ref = hf_logits(out, ids, mask)
    assert ref[REAL].std() > 0.3
    assert np.abs(ref - logits(model))[REAL].max() <= 1e-4
    assert not (out / "tokenizer.json").exists()


# --- broken and unsupported checkpoints -----------------------------------------------------

def test_truncated_safetensors(ckpts, tmp_path):
    path = broken_copy(ckpts["llama"], tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_hf(path)


def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_wrong_shaped_tensor(ckpts, tmp_path):
    path = broken_copy(ckpts["llama"], tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(path, lambda t: t.update({name: np.zeros((128, 60), np.float32)}))
    with pytest.raises(CheckpointError) as e:
        load_hf(path)
    msg = str(e.value)
    assert f"tensor {name} in model.safetensors has shape (128, 60), expected (128, 64)" in msg


def test_missing_tensor(ckpts, tmp_path):
    path = broken_copy(ckpts["mistral"], tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor {name} \(expected shape \(32, 64\)"
                                              r"\) in model\.safetensors"):
        load_hf(path)


def test_extra_tensor_is_an_error_but_rotary_buffers_are_ignored(ckpts, tmp_path):
    path = broken_copy(ckpts["qwen2"], tmp_path)
    buf = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _edit_tensors(path, lambda t: t.update({buf: np.ones(8, np.float32)}))
    load_hf(path, tokenizer=False)
    extra = "model.layers.0.self_attn.q_norm.weight"
    _edit_tensors(path, lambda t: t.update({extra: np.ones(16, np.float32)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor {extra} in model\.safetensors"):
        load_hf(path, tokenizer=False)


def test_unknown_architecture(ckpts, tmp_path):
    path = broken_copy(ckpts["llama"], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(CheckpointError) as e:
        load_hf(path)
    msg = str(e.value)
    assert "'falcon'" in msg and str(path) in msg and "'llama'" in msg and "'mistral'" in msg


def test_pickle_only_folder_is_refused(ckpts, tmp_path):
    path = broken_copy(ckpts["llama"], tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle.*safe_serialization"):
        load_hf(path)


def test_missing_shard(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{hfio.INDEX}.*{shard.name}"):
        load_hf(path)


def test_missing_config_and_tokenizer(ckpts, tmp_path):
    path = broken_copy(ckpts["llama"], tmp_path)
    for f in path.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files.*tokenizer=False"):
        load_hf(path)
    model, tok = load_hf(path, tokenizer=False)
    assert tok is None and isinstance(model, Llama)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(path)


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="'no-such-org/tiny' is not a local folder and could "
                                              "not be downloaded"):
        load_hf("no-such-org/tiny")


def test_registry_hooks():
    arch = hfio.architecture("qwen2")
    for fn in ("config_from_hf", "build", "params_from_hf", "params_to_hf"):
        assert callable(getattr(arch, fn))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported"):
        hfio.architecture("bert")
