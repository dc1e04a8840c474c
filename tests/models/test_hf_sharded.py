"""Sharded loading (each parameter read straight into its NamedSharding), stacked (scanned)
layers, sharded and multi-host export; against HF torch, the unsharded path and the file bits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from prefjax import parallel
from prefjax.models import CheckpointError, load_hf, save_hf
from prefjax.models import hf as hfio
from prefjax.models.llama import LlamaConfig
from tests.models.hf_fixtures import hf_logits, make_hf_model, make_tiny_checkpoint, padded_batch

ROOT = Path(__file__).resolve().parents[2]
MESH = {"fsdp": 4, "tensor": 2}
REAL = padded_batch()[1].astype(bool)
CKPTS = {  # name -> (kind, make_tiny_checkpoint options)
    "qwen2": ("qwen2", dict(max_shard_size="40KB")),
    "gpt2": ("gpt2", dict(tie_word_embeddings=False, n_inner=96)),
    "llama3_rope": ("llama3_rope", {}),
    "mistral_bf16": ("mistral", dict(dtype=torch.bfloat16, max_shard_size="40KB")),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            kind, kw = CKPTS[name]
            made[name] = make_tiny_checkpoint(kind, tmp_path_factory.mktemp(name),
                                              tokenizer=False, **kw)
        return made[name]

    return get


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(MESH)


def flat_params(model) -> dict:
    return traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())


def targets(model, mesh) -> dict:
    """The NamedSharding each parameter should have under the default rules."""
    state = nnx.state(model, nnx.Param)
    return traverse_util.flatten_dict(parallel.param_shardings(state, mesh).to_pure_dict())


def logits(model) -> np.ndarray:
    ids, mask = padded_batch()
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    return np.asarray(f(state, jnp.asarray(ids), jnp.asarray(mask)))


def hf_ref(name) -> np.ndarray:
    kind, kw = CKPTS[name]
    kw = {k: v for k, v in kw.items() if k not in ("max_shard_size", "dtype")}
    ids, mask = padded_batch()
    return hf_logits(make_hf_model(kind, **kw), ids, mask)


def assert_placed(model, mesh):
    want = targets(model, mesh)
    got = flat_params(model)
    for path, x in got.items():
        assert x.sharding == want[path], path
    # not vacuous: some kernels really are split over both axes
    split = [p for p, s in want.items() if {"fsdp", "tensor"} <= set(s.spec)]
    assert len(split) >= 4


class ReadLog:
    """Records every leaf callback (its global shape, index and result) and every file read."""

    def __init__(self, monkeypatch):
        self.calls, self.reads = [], []
        real_cb, real_read = hfio.leaf_callback, hfio.read_slice

        def leaf_callback(pieces, index, shape, dtype):
            cb = real_cb(pieces, index, shape, dtype)

            def logged(idx):
                n = len(self.reads)
                out = cb(idx)
                self.calls.append((tuple(pieces[0].path), shape, idx, out, self.reads[n:]))
                return out

            return logged

        def read_slice(info, region, dtype, transpose=False):
            out = real_read(info, region, dtype, transpose)
            self.reads.append((info, out.shape, out.dtype))
            return out

        monkeypatch.setattr(hfio, "leaf_callback", leaf_callback)
        monkeypatch.setattr(hfio, "read_slice", read_slice)


# --- loading onto a mesh ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2", "gpt2", "llama3_rope"])
def test_sharded_load_matches_unsharded_and_hf(name, ckpt, mesh, monkeypatch):
    log = ReadLog(monkeypatch)
    model, _ = load_hf(ckpt(name), tokenizer=False, mesh=mesh)
    assert_placed(model, mesh)
    got = logits(model)
    plain, _ = load_hf(ckpt(name), tokenizer=False)
    assert np.abs(got - logits(plain))[REAL].max() <= 1e-5
    assert np.abs(got - hf_ref(name))[REAL].max() <= 1e-4
    # every callback returned exactly its shard, assembled from reads of exactly that size
    assert log.calls
    for _, shape, idx, out, reads in log.calls:
        want = tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))
        assert out.shape == want
        assert sum(np.prod(r[1]) for r in reads) == np.prod(want)


def test_reads_never_hold_a_whole_split_tensor(ckpt, mesh, monkeypatch):
    """bf16 file, float32 parameters: each read is one device's slice, widened after slicing."""
    log = ReadLog(monkeypatch)
    model, _ = load_hf(ckpt("mistral_bf16"), tokenizer=False, mesh=mesh)
    want = targets(model, mesh)
    split = {p for p, sh in want.items() if any(a is not None for a in sh.spec)}
    assert len(split) > 10
    checked = 0
    for path, _, _, out, reads in log.calls:
        assert out.dtype == np.float32
        for info, shape, dtype in reads:
            assert info.dtype == "BF16" and dtype == np.float32
            if path in split:
                assert np.prod(shape) <= np.prod(info.shape) // 2, path
                checked += 1
    assert checked >= 8 * len(split)  # each device of each split leaf read its own part


def test_bf16_checkpoint_loaded_as_bf16_keeps_the_file_bits(ckpt, mesh):
    path = ckpt("mistral_bf16")
    model, _ = load_hf(path, tokenizer=False, mesh=mesh, param_dtype=jnp.bfloat16,
                       dtype=jnp.bfloat16)
    assert_placed(model, mesh)
    assert {x.dtype for x in flat_params(model).values()} == {jnp.dtype(jnp.bfloat16)}
    files = {}
    for f in path.glob("*.safetensors"):
        files.update(load_torch(str(f)))
    got = hfio.architecture("mistral").params_to_hf(model, model.config)
    assert set(got) == set(files)
    for name, x in got.items():
        assert x.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(x.view(np.int16), files[name].view(torch.int16).numpy(),
                                      err_msg=name)


def test_reward_model_from_hf_on_a_mesh_in_bf16(ckpt, mesh, tmp_path):
    from prefjax.models.heads import RewardModel, save_reward_model

    trained = RewardModel.from_hf(ckpt("qwen2"), rngs=nnx.Rngs(5))
    trained.head.bias[...] = jnp.asarray([0.7])
    path = save_reward_model(trained, tmp_path / "rm", max_shard_size="50KB")
    plain = RewardModel.from_hf(path, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    rm = RewardModel.from_hf(path, rngs=nnx.Rngs(0), mesh=mesh, param_dtype=jnp.bfloat16)
    assert_placed(rm.decoder, mesh)
    head = traverse_util.flatten_dict(nnx.state(rm.head, nnx.Param).to_pure_dict())
    want = traverse_util.flatten_dict(parallel.param_shardings(
        nnx.state(rm.head, nnx.Param), mesh).to_pure_dict())
    assert all(head[p].sharding == want[p] for p in want)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(rm, nnx.Param))} == {
        jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(rm.head.kernel[...], np.float32),
                                  np.asarray(trained.head.kernel[...]).astype(
                                      ml_dtypes.bfloat16).astype(np.float32))
    ids, mask = map(jnp.asarray, padded_batch())
    graphdef, state = nnx.split(rm)
    got = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, mask))(state)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain(ids, mask)), atol=1e-5)


# --- stacked (scanned) layers -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_scanned_model_from_hf_checkpoint(name, ckpt, mesh, tmp_path):
    scanned, _ = load_hf(ckpt(name), tokenizer=False, mesh=mesh,
                         config_overrides={"scan_layers": True})
    assert scanned.config.scan_layers
    params = flat_params(scanned)
    n = scanned.config.num_layers
    stacked = [p for p in params if p[0] == "layers"]
    assert stacked and all(not isinstance(p[1], int) for p in stacked)
    assert all(params[p].shape[0] == n for p in stacked)
    assert_placed(scanned, mesh)
    assert np.abs(logits(scanned) - hf_ref(name))[REAL].max() <= 1e-4
    # un-stacked on save: the same files as the loop model's export
    loop, _ = load_hf(ckpt(name), tokenizer=False)
    a, b = save_hf(scanned, tmp_path / "scanned"), save_hf(loop, tmp_path / "loop")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_stacked_layout_round_trip_in_numpy():
    """hf_layout with `layer`: per-layer HF tensors <-> stacked leaves, both directions."""
    from prefjax.models import llama as L

    cfg = LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=12, num_layers=3,
                      num_heads=2, num_kv_heads=1, qkv_bias=True, scan_layers=True)
    r = np.random.default_rng(0)
    shapes = {n: s for n, s in hfio.hf_shapes(
        hfio.pieces_of(L.hf_layout(cfg)),
        {p: s for p, s in _leaf_shapes(cfg).items()}).items()}
    tensors = {n: r.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    pure = L.params_from_hf(tensors, cfg)
    q = pure["layers"]["attn"]["q"]["kernel"]
    assert q.shape == (3, 8, 8)
    np.testing.assert_array_equal(q[2], tensors["model.layers.2.self_attn.q_proj.weight"].T)
    back = L.params_to_hf(pure, cfg)
    assert set(back) == set(tensors)
    for n, x in tensors.items():
        np.testing.assert_array_equal(back[n], x, err_msg=n)


def _leaf_shapes(cfg) -> dict:
    from prefjax.models import llama as L

    _, params, _ = hfio._abstract(L, cfg, jnp.float32, jnp.float32, False)
    return {p: s.shape for p, s in traverse_util.flatten_dict(params.to_pure_dict()).items()}


# --- saving -----------------------------------------------------------------------------------

def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_multi_file_save_loads_in_transformers_and_equals_single_file(ckpt, mesh, tmp_path):
    model, _ = load_hf(ckpt("qwen2"), tokenizer=False, mesh=mesh)
    one = save_hf(model, tmp_path / "one")
    many = save_hf(model, tmp_path / "many", max_shard_size="30KB")
    assert [f.name for f in one.glob("*.safetensors")] == ["model.safetensors"]
    assert not (one / hfio.INDEX).exists()
    files = sorted(f.name for f in many.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((many / hfio.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(files)
    ref, got = _tensors(one), _tensors(many)
    assert set(ref) == set(got) == set(index["weight_map"])
    for name, x in ref.items():
        assert x.dtype == np.float32
        np.testing.assert_array_equal(got[name].view(np.int32), x.view(np.int32), err_msg=name)
    for f in files:  # a file passes the limit only when it holds one tensor larger than it
        held = [k for k, v in index["weight_map"].items() if v == f]
        assert (many / f).stat().st_size <= 30_000 + 4096 or len(held) == 1
    ids, mask = padded_batch()
    assert np.abs(hf_logits(many, ids, mask) - logits(model))[REAL].max() <= 1e-4
    # saving again as one file replaces the shards and the index
    save_hf(model, many)
    assert sorted(f.name for f in many.glob("*.safetensors")) == ["model.safetensors"]
    assert not (many / hfio.INDEX).exists()


def test_bf16_save_loads_in_transformers(ckpt, tmp_path):
    model, _ = load_hf(ckpt("llama3_rope"), tokenizer=False)
    out = save_hf(model, tmp_path / "bf16", dtype=jnp.bfloat16, max_shard_size="50KB")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    files = {}
    for f in out.glob("*.safetensors"):
        files.update(load_torch(str(f)))
    want = hfio.architecture("llama").params_to_hf(model, model.config)
    for name, x in want.items():
        assert files[name].dtype == torch.bfloat16
        np.testing.assert_array_equal(files[name].float().numpy(),
                                      x.astype(ml_dtypes.bfloat16).astype(np.float32))
    ids, mask = padded_batch()
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    half, _ = load_hf(out, tokenizer=False)
    assert np.abs(hf_logits(hf, ids, mask) - logits(half))[REAL].max() <= 1e-4


def test_parse_size():
    assert hfio.parse_size("2GB") == 2 * 10**9
    assert hfio.parse_size("500MiB") == 500 * 2**20
    assert hfio.parse_size("40KB") == 40_000 and hfio.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size 'big'"):
        hfio.parse_size("big")


# --- bad input: refused from the headers, before any parameter exists ---------------------------

@pytest.fixture
def no_placement(monkeypatch):
    def place(*a, **k):
        raise AssertionError("a parameter was created before the checkpoint was checked")

    monkeypatch.setattr(hfio, "place", place)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_index_naming_a_missing_shard(ckpt, mesh, tmp_path, no_placement):
    path = _copy(ckpt("qwen2"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[2]
    held = sorted(load_file(str(shard)))
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        load_hf(path, tokenizer=False, mesh=mesh)
    msg = str(e.value)
    assert hfio.INDEX in msg and shard.name in msg and held[0] in msg


def test_index_disagreeing_with_a_shard(ckpt, mesh, tmp_path, no_placement):
    path = _copy(ckpt("qwen2"), tmp_path)
    index = json.loads((path / hfio.INDEX).read_text())
    files = list(index["weight_map"].values())
    name, f = next((n, f) for n, f in sorted(index["weight_map"].items()) if files.count(f) > 1)
    other = next(v for v in index["weight_map"].values() if v != f)
    index["weight_map"][name] = other
    (path / hfio.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"puts tensor {name} in {other}, but it is in {f}"):
        load_hf(path, tokenizer=False, mesh=mesh)


def test_wrong_shape_in_a_shard(ckpt, mesh, tmp_path, no_placement):
    path = _copy(ckpt("qwen2"), tmp_path)
    index = json.loads((path / hfio.INDEX).read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    f = path / index["weight_map"][name]
    tensors = load_file(str(f))
    tensors[name] = np.zeros((48, 64), np.float32)
    hfio.write_safetensors(f, tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf(path, tokenizer=False, mesh=mesh)
    assert f"tensor {name} in {f.name} has shape (48, 64), expected (32, 64)" in str(e.value)


def test_truncated_shard(ckpt, mesh, tmp_path, no_placement):
    path = _copy(ckpt("qwen2"), tmp_path)
    f = sorted(path.glob("model-*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{f.name}: cannot read .*truncated or corrupt.*"
                                              r"tensor \S+ F32"):
        load_hf(path, tokenizer=False, mesh=mesh)


def test_unsupported_architecture(ckpt, mesh, tmp_path, no_placement):
    path = _copy(ckpt("qwen2"), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_moe"}))
    with pytest.raises(CheckpointError) as e:
        load_hf(path, tokenizer=False, mesh=mesh)
    msg = str(e.value)
    assert str(path / "config.json") in msg and "'qwen2_moe' is not supported" in msg


# --- memory: a loader-only process never holds a full copy of the checkpoint -------------------

_LOAD_ONLY = r"""
import json, os, sys
import jax, jax.numpy as jnp
from flax import nnx
from prefjax import parallel
from prefjax.models import hf

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

mesh = parallel.make_mesh({"fsdp": 8})
before = rss()
model, _ = hf.load_hf(sys.argv[1], tokenizer=False, mesh=mesh, param_dtype=jnp.bfloat16)
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
# VmHWM: this process's peak (ru_maxrss would carry the forking parent's peak over exec)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"before": before, "peak": peak, "after": rss()}))
"""


def _big_bf16_checkpoint(path: Path) -> int:
    """A ~250 MB bf16 Llama checkpoint in 3 shards (constant tensors: only bytes matter here);
    returns the bytes of tensor data."""
    from prefjax.models import llama as L

    cfg = LlamaConfig(vocab_size=24000, hidden_size=1024, intermediate_size=2816, num_layers=6,
                      num_heads=8, num_kv_heads=8)
    shapes = hfio.hf_shapes(hfio.pieces_of(L.hf_layout(cfg)), _leaf_shapes(cfg))
    names = list(shapes)
    groups = [names[i::3] for i in range(3)]
    path.mkdir()
    weight_map = {}
    for i, group in enumerate(groups):
        f = f"model-{i + 1:05d}-of-00003.safetensors"
        hfio.write_safetensors(path / f, {n: np.broadcast_to(
            np.asarray(0.01 * (j + 1), ml_dtypes.bfloat16), shapes[n]) for j, n in
            enumerate(group)})
        weight_map.update(dict.fromkeys(group, f))
    (path / hfio.INDEX).write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    return sum(int(np.prod(s)) * 2 for s in shapes.values())


def test_loader_peak_memory_is_one_copy_of_the_checkpoint(tmp_path):
    size = _big_bf16_checkpoint(tmp_path / "big")
    assert 200e6 < size < 400e6
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _LOAD_ONLY, str(tmp_path / "big")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["before"]
    print(f"checkpoint {size / 1e6:.0f} MB, loader peak growth {grown / 1e6:.0f} MB")
    # the bf16 parameters themselves are one copy, plus the pages of the tensor being read and
    # the runtime; a loader that read the checkpoint (or widened it) before placing it needs two
    assert grown < 1.5 * size, (grown, size)
    assert m["after"] - m["before"] > 0.9 * size  # the parameters are really in memory


# --- several hosts: load onto a mesh spanning two processes, export from all of them ------------

_HOST = r"""
import json, sys
import jax
src, out, n, pid, port = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
if n > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", n, pid)
from prefjax import parallel
from prefjax.models import hf
mesh = parallel.make_mesh(json.loads(sys.argv[6]))
for scan in (False, True):  # the scanned model exports un-stacked layers, the same files
    model, _ = hf.load_hf(src, tokenizer=False, mesh=mesh,
                          config_overrides={"scan_layers": scan})
    leaves = jax.tree.leaves(model)
    assert n == 1 or not any(x.is_fully_addressable for x in leaves if isinstance(x, jax.Array)
                             and x.sharding.spec)
    hf.save_hf(model, f"{out}/{'s' if scan else 'p'}{pid}", max_shard_size="60KB")
"""


def _run_hosts(src: Path, out: Path, n: int) -> None:
    from tests.multihost.test_multihost import free_port, run_processes

    port = free_port()
    out.mkdir(parents=True)
    cmds = [[sys.executable, "-c", _HOST, str(src), str(out), str(n), str(i), str(port),
             json.dumps(MESH)] for i in range(n)]
    run_processes(cmds, [out / f"log_{i}.txt" for i in range(n)], timeout_s=180)


@pytest.mark.slow
def test_two_hosts_export_the_same_files_as_one(ckpt, mesh, tmp_path):
    """2 processes x 4 devices, fsdp and tensor axes spanning both: the export equals one
    8-device process's, file for file and byte for byte."""
    src = ckpt("qwen2")
    one = save_hf(load_hf(src, tokenizer=False, mesh=mesh)[0], tmp_path / "one",
                  max_shard_size="60KB")
    _run_hosts(src, tmp_path / "two", 2)
    names = sorted(f.name for f in one.iterdir())
    assert hfio.INDEX in names and len([f for f in names if f.endswith(".safetensors")]) > 2
    for two in ("p", "s"):  # loop and scanned models
        assert not (tmp_path / "two" / f"{two}1").exists()  # only process 0 writes
        got = tmp_path / "two" / f"{two}0"
        assert sorted(f.name for f in got.iterdir()) == names
        for f in names:
            assert (one / f).read_bytes() == (got / f).read_bytes(), (two, f)
    ref = load_hf(src, tokenizer=False)[0]
    again = load_hf(one, tokenizer=False)[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param).to_pure_dict(),
                 nnx.state(ref, nnx.Param).to_pure_dict())
