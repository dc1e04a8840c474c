"""Load and save Hugging Face checkpoints: config.json + (sharded) safetensors <-> NNX models.

Architectures plug in through `ARCHITECTURES`: model_type -> module path. Each module provides
four functions (and optionally `HF_IGNORE`, regexes of harmless checkpoint tensors to skip):

  config_from_hf(dict) -> config        (the config must have `to_hf(model_type) -> dict`)
  build(config, rngs, dtype, param_dtype, remat) -> nnx.Module   (with a `.config` attribute)
  params_from_hf(tensors: dict[str, np.ndarray], config) -> nested dict like
      nnx.state(model, nnx.Param).to_pure_dict()
  params_to_hf(model_or_state, config) -> dict[str, np.ndarray]; this module always passes the
      nested pure dict of numpy arrays (for shape checks, zero-stride views: use only views,
      transposes and slicing on them).

Tensors are read with safetensors (numpy), never with pickle.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

ARCHITECTURES = {
    "llama": "prefjax.models.llama",
    "qwen2": "prefjax.models.llama",
    "mistral": "prefjax.models.llama",
    "gpt2": "prefjax.models.gpt2",
}
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX, "tokenizer*",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.*"]
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or does not match the architecture."""


def architecture(model_type: str | None, where: str = "config") -> Any:
    """The hooks module for `model_type` (imported on first use)."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; prefjax supports "
            f"{sorted(ARCHITECTURES)}")
    try:
        return importlib.import_module(ARCHITECTURES[model_type])
    except ImportError as e:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} needs {ARCHITECTURES[model_type]}, which could "
            f"not be imported ({e})") from e


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
            remat: bool = False, tokenizer: bool = True) -> tuple[nnx.Module, Any]:
    """`(model, tokenizer)` from a local HF folder, or a hub name when `path` is not a folder.

    The folder holds config.json, model.safetensors (or shards + model.safetensors.index.json)
    and tokenizer files. `dtype` is the compute dtype, `param_dtype` that of the weights.
    `tokenizer=False` skips the tokenizer and returns None in its place.
    """
    folder = resolve(path)
    hf_cfg = read_config(folder)
    arch = architecture(hf_cfg.get("model_type"), f"{folder / 'config.json'}")
    try:
        cfg = arch.config_from_hf(hf_cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {type(e).__name__}: {e}") from e
    model = _load_model(arch, cfg, folder, dtype, param_dtype, remat)
    return model, (load_tokenizer(folder) if tokenizer else None)


def resolve(path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is tried as a hub repo id (snapshot_download)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; load_hf expects a checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(path), allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, bad id: all mean "cannot get it"
        raise CheckpointError(
            f"{str(path)!r} is not a local folder and could not be downloaded from the Hugging "
            f"Face Hub ({type(e).__name__}: {e}). Pass an existing checkpoint folder, or a "
            "hub repo id with network access (HF_HUB_OFFLINE unset).") from e


def read_config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder}: no config.json; a HF checkpoint folder needs config.json "
                              "next to its safetensors weights")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from e


def load_tokenizer(folder: Path):
    """`transformers.AutoTokenizer` from the folder; clear error when it has no tokenizer files."""
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); save a "
            "tokenizer there or call load_hf(..., tokenizer=False)")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards the index names)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [n for n in _PICKLE_FILES if (folder / n).is_file()]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only {pickles[0]}, a pickle checkpoint; prefjax refuses pickle "
            "(it can run arbitrary code). Convert it once with transformers: "
            "model.save_pretrained(folder, safe_serialization=True)")
    raise CheckpointError(f"{folder}: no model.safetensors or {INDEX}")


def tensor_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape) from the safetensors headers, without reading the data."""
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="np") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name in out:
                        raise CheckpointError(f"tensor {name!r} is in both {out[name][0]} and {f}")
                    out[name] = (f, tuple(st.get_slice(name).get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors file, truncated or corrupt? "
                                  f"({type(e).__name__}: {e})") from e
    return out


def read_tensors(names: list[str], index: dict[str, tuple[Path, tuple[int, ...]]]
                 ) -> dict[str, np.ndarray]:
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n][0], []).append(n)
    out = {}
    for f, ns in by_file.items():
        try:
            with safe_open(str(f), framework="np") as st:
                for n in ns:
                    if st.get_slice(n).get_dtype() == "BF16":  # numpy has no bfloat16 backend
                        out[n] = _read_bf16(f, n)
                    else:
                        out[n] = st.get_tensor(n)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensors ({type(e).__name__}: {e})") from e
    return out


def _read_bf16(f: Path, name: str) -> np.ndarray:
    # safetensors layout: u64 little-endian header size, JSON header, then raw tensor bytes.
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
    start, end = info["data_offsets"]
    x = np.fromfile(f, dtype=ml_dtypes.bfloat16, count=(end - start) // 2, offset=8 + n + start)
    return x.reshape(info["shape"])


def _load_model(arch, cfg, folder: Path, dtype, param_dtype, remat: bool) -> nnx.Module:
    # Build only the structure (no random weights), then fill it with the checkpoint.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: arch.build(cfg, nnx.Rngs(0), dtype, param_dtype, remat))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise CheckpointError(f"{arch.__name__}.build makes non-parameter variables, which a "
                              "checkpoint cannot fill")
    shapes = params.to_pure_dict()
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), shapes)
    expected = {n: tuple(a.shape) for n, a in arch.params_to_hf(zeros, cfg).items()}

    files = weight_files(folder)
    index = tensor_index(files)
    ignore = [re.compile(p) for p in getattr(arch, "HF_IGNORE", ())]
    where = "/".join(f.name for f in files) if len(files) < 4 else f"{len(files)} shards"
    problems = [f"missing tensor {n} (expected shape {s}) in {where}"
                for n, s in expected.items() if n not in index]
    problems += [f"tensor {n} in {index[n][0].name} has shape {index[n][1]}, expected {s}"
                 for n, s in expected.items() if n in index and index[n][1] != s]
    problems += [f"unexpected tensor {n} in {index[n][0].name}" for n in index
                 if n not in expected and not any(p.search(n) for p in ignore)]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"checkpoint {folder} does not match its config.json "
            f"(model_type {getattr(cfg, 'model_type', '?')!r}):\n  "
            + "\n  ".join(problems[:10]) + more)

    pure = arch.params_from_hf(read_tensors(list(expected), index), cfg)
    got = jax.tree.map(np.shape, pure)
    if got != jax.tree.map(lambda s: s.shape, shapes):
        raise CheckpointError(f"{arch.__name__}.params_from_hf returned a tree that does not "
                              "match the model's parameters")
    pure = jax.tree.map(lambda x, s: jnp.asarray(x, dtype=s.dtype), pure, shapes)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def save_hf(model: nnx.Module, path: str | os.PathLike, *, tokenizer=None,
            model_type: str | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) that transformers loads; returns path.

    `model_type` defaults to `model.config.model_type`. Weights are written as float32 (numpy
    safetensors has no bfloat16); the config records dtype float32 accordingly.
    """
    cfg = model.config
    model_type = model_type or getattr(cfg, "model_type", None)
    arch = architecture(model_type, f"save_hf({type(model).__name__})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pure = jax.tree.map(lambda x: np.asarray(jax.device_get(x)),
                        nnx.state(model, nnx.Param).to_pure_dict())
    tensors = {n: np.ascontiguousarray(x, dtype=np.float32)
               for n, x in arch.params_to_hf(pure, cfg).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg.to_hf(model_type), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
