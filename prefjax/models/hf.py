"""Load and save Hugging Face checkpoints: config.json + (sharded) safetensors <-> NNX models.

Architectures plug in through `ARCHITECTURES`: model_type -> module path. Each module provides
(and optionally `HF_IGNORE`, regexes of harmless checkpoint tensors to skip):

  config_from_hf(dict) -> config        (the config must have `to_hf(model_type) -> dict`)
  build(config, rngs, dtype, param_dtype, remat) -> nnx.Module   (with a `.config` attribute)
  hf_layout(config) -> list of `(hf_name, path, transpose, layer[, cols])`, one per piece:
      `path` is the leaf's key path in `nnx.state(model, nnx.Param).to_pure_dict()`;
      the piece is `T(hf_tensor[..., c0:c1])` with T the axis reversal when `transpose`
      (HF Linear weights are [out, in], ours [in, out]) and `cols = (c0, c1)` (default: the
      whole tensor; GPT-2's fused c_attn is split this way); `layer=None`: the piece is the
      whole leaf; `layer=i`: it is slice i of a leaf stacked over layers (`nnx.scan`).
  params_from_hf(tensors, config) / params_to_hf(model_or_state, config): numpy conveniences
      over the layout (`params_from_tensors` / `tensors_from_params` below).

Loading never builds the whole model on one host: the model is only traced (`nnx.eval_shape`),
every check is made on the safetensors headers, then each parameter is created as a global
jax.Array in its NamedSharding (`prefjax.parallel` rules), each device's shard read from a
memory map of just its slice. Saving gathers one tensor at a time (across hosts when the
parameters span them), writes on process 0 only, in shard files of at most `max_shard_size`.
Tensors are read and written as raw safetensors, never with pickle.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from prefjax import parallel

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
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
          "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_ST_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or does not match the architecture."""


class Piece(NamedTuple):
    """One `hf_layout` entry (see the module docstring)."""

    name: str
    path: tuple
    transpose: bool = False
    layer: int | None = None
    cols: tuple[int, int] | None = None


class TensorInfo(NamedTuple):
    """Where a tensor's bytes are: `file`, safetensors `dtype` name, `shape`, byte `offset`."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int


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
            remat: bool = False, tokenizer: bool = True, mesh: jax.sharding.Mesh | None = None,
            rules: parallel.Rules | None = None,
            config_overrides: dict[str, Any] | None = None) -> tuple[nnx.Module, Any]:
    """`(model, tokenizer)` from a local HF folder, or a hub name when `path` is not a folder.

    The folder holds config.json, model.safetensors (or shards + model.safetensors.index.json)
    and tokenizer files. `dtype` is the compute dtype, `param_dtype` that of the weights (a
    frozen model may be kept in bf16). With `mesh`, every parameter is created directly in its
    NamedSharding from `rules` (default `parallel.DEFAULT_RULES`), each device reading only its
    shard; without, parameters are uncommitted arrays on the default device.
    `config_overrides` replaces config fields (e.g. `{"scan_layers": True}`).
    `tokenizer=False` skips the tokenizer and returns None in its place.
    """
    folder = resolve(path)
    hf_cfg = read_config(folder)
    arch = architecture(hf_cfg.get("model_type"), f"{folder / 'config.json'}")
    try:
        cfg = arch.config_from_hf(hf_cfg)
        if config_overrides:
            cfg = dataclasses.replace(cfg, **config_overrides)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {type(e).__name__}: {e}") from e
    model = _load_model(arch, cfg, folder, dtype, param_dtype, remat, mesh,
                        parallel.DEFAULT_RULES if rules is None else rules)
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


# --- safetensors files: headers, slices, writing -------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards the index names)."""
    index = folder / INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            held = sorted(n for n, f in weight_map.items() if f in missing)
            raise CheckpointError(
                f"{index} names shard(s) {missing} that are not in {folder} (they hold "
                f"{len(held)} tensors, e.g. {held[0]})")
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


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is empty or not a mapping")
    return weight_map


def read_header(f: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo from a safetensors header (u64 little-endian size, JSON), checked
    against the file size; no tensor data is read."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + n > size:
                raise ValueError(f"header of {n} bytes does not fit the {size}-byte file")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        out = {}
        for name, h in header.items():
            dtype, shape, (start, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
            if dtype not in DTYPES:
                raise CheckpointError(f"{f}: tensor {name} has dtype {dtype}; prefjax reads "
                                      f"{sorted(DTYPES)}")
            want = math.prod(shape) * DTYPES[dtype].itemsize
            if end - start != want or 8 + n + end > size:
                raise ValueError(f"tensor {name} {dtype}{list(shape)} needs {want} bytes at "
                                 f"[{start}, {end}) of the data, the file has {size - 8 - n}")
            out[name] = TensorInfo(f, dtype, shape, 8 + n + start)
        return out
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors file, truncated or corrupt? "
                              f"({type(e).__name__}: {e})") from e


def tensor_index(files: list[Path]) -> dict[str, TensorInfo]:
    """name -> TensorInfo over all files (and the index's weight_map, when there is one)."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} is in both {out[name].file} and {f}")
            out[name] = info
    index = files[0].parent / INDEX
    if index.is_file():
        for name, fname in _weight_map(index).items():
            if name not in out or out[name].file.name != fname:
                where = (out[name].file.name if name in out else
                         "none of the files the index names")
                raise CheckpointError(f"{index} puts tensor {name} in {fname}, but it is in "
                                      f"{where}")
    return out


def read_slice(info: TensorInfo, region: tuple[slice, ...], dtype, transpose: bool = False
               ) -> np.ndarray:
    """`T(tensor[region])` as a new `dtype` array; only the region is read and converted.

    The file is memory-mapped for the duration of the call (the map closes on return), so a
    bf16 tensor is sliced before it is widened and resident memory stays one slice.
    """
    mm = np.memmap(info.file, dtype=DTYPES[info.dtype], mode="r", offset=info.offset,
                   shape=info.shape)
    part = mm[region]
    part = part.T if transpose else part
    out = np.empty(part.shape, dtype)
    out[...] = part
    return out


def write_safetensors(f: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of `tensors` (in order; header padded to 8 bytes, as safetensors)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, x in tensors.items():
        header[name] = {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(f, "wb") as fh:
        fh.write(len(h).to_bytes(8, "little"))
        fh.write(h)
        for x in tensors.values():
            fh.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)


def parse_size(size: int | str) -> int:
    """Bytes of `2000000`, "2GB" (10^9) or "2GiB" (2^30), as transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '2GB' / '500MiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


# --- the layout: HF tensors <-> parameter leaves ---------------------------------------------

def pieces_of(entries) -> list[Piece]:
    """`hf_layout` entries (plain tuples) as Pieces."""
    return [Piece(*e) for e in entries]


def layout(arch, cfg) -> list[Piece]:
    return pieces_of(arch.hf_layout(cfg))


def _by_leaf(pieces: list[Piece]) -> dict[tuple, list[Piece]]:
    out: dict[tuple, list[Piece]] = {}
    for p in pieces:
        out.setdefault(tuple(p.path), []).append(p)
    return out


def _by_name(pieces: list[Piece]) -> dict[str, list[Piece]]:
    out: dict[str, list[Piece]] = {}
    for p in pieces:
        out.setdefault(p.name, []).append(p)
    return {n: sorted(ps, key=lambda p: p.cols or (0, 0)) for n, ps in out.items()}


def check_layout(where: str, pieces: list[Piece], leaf_shapes: dict[tuple, tuple]) -> None:
    """The layout covers every leaf exactly once (each layer of a stacked leaf once)."""
    leaves = _by_leaf(pieces)
    problems = [f"no HF tensor for parameter {p}" for p in leaf_shapes if p not in leaves]
    problems += [f"layout names {p}, which is not a parameter" for p in leaves
                 if p not in leaf_shapes]
    for p, ps in leaves.items():
        if p not in leaf_shapes:
            continue
        layers = sorted(x.layer for x in ps if x.layer is not None)
        if len(layers) != len(ps) and len(ps) != 1:
            problems.append(f"parameter {p} has {len(ps)} pieces, not stacked")
        elif layers and layers != list(range(leaf_shapes[p][0])):
            problems.append(f"stacked parameter {p} of shape {leaf_shapes[p]} has layers "
                            f"{layers}")
    if problems:
        raise CheckpointError(f"{where}.hf_layout does not match the model's parameters: "
                              + "; ".join(problems[:5]))


def hf_shapes(pieces: list[Piece], leaf_shapes: dict[tuple, tuple]) -> dict[str, tuple]:
    """HF tensor name -> shape implied by the parameter shapes."""
    out: dict[str, tuple] = {}
    for name, ps in _by_name(pieces).items():
        s = tuple(leaf_shapes[tuple(ps[0].path)])
        s = s[1:] if ps[0].layer is not None else s
        s = s[::-1] if ps[0].transpose else s
        if ps[0].cols is not None:
            s = (*s[:-1], max(p.cols[1] for p in ps))
        out[name] = s
    return out


def _piece_of(x: np.ndarray, p: Piece) -> np.ndarray:
    x = x if p.cols is None else x[..., p.cols[0]:p.cols[1]]
    return x.T if p.transpose else x


def params_from_tensors(entries, tensors: dict[str, np.ndarray]) -> dict:
    """HF tensors (numpy) -> nested params dict (views where possible; stacked leaves copy)."""
    pieces = pieces_of(entries)
    flat = {}
    for path, ps in _by_leaf(pieces).items():
        if ps[0].layer is None:
            flat[path] = _piece_of(tensors[ps[0].name], ps[0])
        else:
            flat[path] = np.stack([_piece_of(tensors[p.name], p)
                                   for p in sorted(ps, key=lambda p: p.layer)])
    return traverse_util.unflatten_dict(flat)


def _numpy_leaf(x, layer: int | None) -> np.ndarray:
    x = np.asarray(x)
    return x if layer is None else x[layer]


def host_array(x, layer: int | None = None) -> np.ndarray:
    """`x` (or its slice `layer`) as numpy on every process, even when `x` spans hosts."""
    if not isinstance(x, jax.Array):
        return _numpy_leaf(x, layer)
    part = x if layer is None else x[layer]
    if part.is_fully_addressable:
        return np.asarray(jax.device_get(part))
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(part, tiled=True)


def hf_tensor(pieces: list[Piece], flat: dict[tuple, Any],
              fetch: Callable[[Any, int | None], np.ndarray] = _numpy_leaf) -> np.ndarray:
    """One HF tensor from the parameter leaves its `pieces` (sorted by cols) come from."""
    parts = []
    for p in pieces:
        x = fetch(flat[tuple(p.path)], p.layer)
        parts.append(x.T if p.transpose else x)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def tensors_from_params(entries, pure: dict) -> dict[str, np.ndarray]:
    """Nested params dict (numpy or jax arrays) -> HF tensor dict (numpy, views where possible)."""
    flat = traverse_util.flatten_dict(pure)
    return {name: hf_tensor(ps, flat) for name, ps in _by_name(pieces_of(entries)).items()}


# --- loading ----------------------------------------------------------------------------------

def _abstract(arch, cfg, dtype, param_dtype, remat: bool):
    # Trace the constructor only: shapes, dtypes and logical names, no weights anywhere.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: arch.build(cfg, nnx.Rngs(0), dtype, param_dtype, remat))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise CheckpointError(f"{arch.__name__}.build makes non-parameter variables, which a "
                              "checkpoint cannot fill")
    return graphdef, params, rest


def check_checkpoint(folder: Path, cfg, expected: dict[str, tuple], index: dict[str, TensorInfo],
                     ignore: tuple[str, ...] = ()) -> None:
    """Every expected tensor present with its shape, nothing unexpected (but `ignore` regexes)."""
    pats = [re.compile(p) for p in ignore]
    files = sorted({i.file.name for i in index.values()})
    where = "/".join(files) if len(files) < 4 else f"{len(files)} shards"
    problems = [f"missing tensor {n} (expected shape {s}) in {where}"
                for n, s in expected.items() if n not in index]
    problems += [f"tensor {n} in {index[n].file.name} has shape {index[n].shape}, expected {s}"
                 for n, s in expected.items() if n in index and index[n].shape != s]
    problems += [f"unexpected tensor {n} in {index[n].file.name}" for n in index
                 if n not in expected and not any(p.search(n) for p in pats)]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"checkpoint {folder} does not match its config.json "
            f"(model_type {getattr(cfg, 'model_type', '?')!r}):\n  "
            + "\n  ".join(problems[:10]) + more)


def _bounds(index, shape) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _read_piece(p: Piece, info: TensorInfo, bounds: list[tuple[int, int]], dtype) -> np.ndarray:
    """The part `bounds` (in the piece's orientation) of piece `p`, read from its tensor."""
    hb = bounds[::-1] if p.transpose else list(bounds)
    if p.cols is not None:
        a, b = hb[-1]
        hb[-1] = (a + p.cols[0], b + p.cols[0])
    return read_slice(info, tuple(slice(a, b) for a, b in hb), dtype, p.transpose)


def leaf_callback(pieces: list[Piece], index: dict[str, TensorInfo], shape: tuple, dtype
                  ) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """`cb(index) -> leaf[index]` for `jax.make_array_from_callback`, read from the files."""
    by_layer = {p.layer: p for p in pieces}

    def cb(idx):
        bounds = _bounds(idx, shape)
        if None in by_layer:
            p = by_layer[None]
            return _read_piece(p, index[p.name], bounds, dtype)
        (lo, hi), rest = bounds[0], bounds[1:]
        out = np.empty((hi - lo, *(b - a for a, b in rest)), dtype)
        for i in range(lo, hi):  # one layer's piece at a time: the shard is the only copy
            out[i - lo] = _read_piece(by_layer[i], index[by_layer[i].name], rest, dtype)
        return out

    return cb


def place(shape: tuple, sharding, cb, commit: bool) -> jax.Array:
    """A global array from per-shard reads; uncommitted (default device) when not `commit`."""
    if commit:
        x = jax.make_array_from_callback(shape, sharding, cb)
    else:
        x = jax.device_put(cb(tuple(slice(None) for _ in shape)))
    # transfers are asynchronous: waiting bounds the host buffers in flight to one leaf's
    return jax.block_until_ready(x)


def _load_model(arch, cfg, folder: Path, dtype, param_dtype, remat: bool, mesh,
                rules) -> nnx.Module:
    graphdef, params, rest = _abstract(arch, cfg, dtype, param_dtype, remat)
    abstract = traverse_util.flatten_dict(params.to_pure_dict())
    leaf_shapes = {p: tuple(s.shape) for p, s in abstract.items()}
    pieces = layout(arch, cfg)
    check_layout(arch.__name__, pieces, leaf_shapes)
    index = tensor_index(weight_files(folder))
    check_checkpoint(folder, cfg, hf_shapes(pieces, leaf_shapes), index,
                     getattr(arch, "HF_IGNORE", ()))
    # Shardings on a one-device mesh without `mesh`: the same names and rules are checked.
    target = mesh if mesh is not None else parallel.make_mesh({}, jax.devices()[:1])
    shardings = traverse_util.flatten_dict(
        parallel.param_shardings(params, target, rules).to_pure_dict())
    leaves = _by_leaf(pieces)
    arrays = {p: place(s.shape, shardings[p], leaf_callback(leaves[p], index, s.shape, s.dtype),
                       mesh is not None)
              for p, s in abstract.items()}
    nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(arrays))
    return nnx.merge(graphdef, params, rest)


# --- saving -----------------------------------------------------------------------------------

def _plan_files(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy grouping in order, as transformers: a file closes before it would pass `limit`;
    a tensor larger than `limit` gets a file of its own."""
    files: list[list[str]] = [[]]
    size = 0
    for n in names:
        if files[-1] and size + nbytes[n] > limit:
            files.append([])
            size = 0
        files[-1].append(n)
        size += nbytes[n]
    return files


def save_hf(model: nnx.Module, path: str | os.PathLike, *, tokenizer=None,
            model_type: str | None = None, max_shard_size: int | str = "2GB",
            dtype=jnp.float32) -> Path:
    """Write config.json + safetensors weights (+ tokenizer) that transformers loads; returns path.

    Call it on every process: each tensor is gathered in turn (across hosts when its shards
    span them) and process 0 writes, holding at most one file's tensors. Weights go to
    model.safetensors, or to `model-0000i-of-0000n.safetensors` + model.safetensors.index.json
    when they pass `max_shard_size` (bytes, "2GB", "500MiB"). `dtype` is the stored dtype
    (float32 default; bfloat16 or float16 halve the files). `model_type` defaults to
    `model.config.model_type`. Earlier weight files in the folder are replaced.
    """
    cfg = model.config
    model_type = model_type or getattr(cfg, "model_type", None)
    arch = architecture(model_type, f"save_hf({type(model).__name__})")
    out_dtype = np.dtype(dtype)
    if out_dtype.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_hf dtype must be float32, bfloat16 or float16, got {out_dtype}")
    path = Path(path)
    flat = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
    pieces = layout(arch, cfg)
    check_layout(arch.__name__, pieces, {p: tuple(np.shape(x)) for p, x in flat.items()})
    shapes = hf_shapes(pieces, {p: tuple(np.shape(x)) for p, x in flat.items()})
    by_name = _by_name(pieces)
    nbytes = {n: math.prod(s) * out_dtype.itemsize for n, s in shapes.items()}
    groups = _plan_files(list(by_name), nbytes, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    main = jax.process_index() == 0
    if main:
        path.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():  # stale weights of an earlier save would shadow these
            if _WEIGHT_FILE.match(f.name) or f.name == INDEX:
                f.unlink()
    for fname, group in zip(names, groups):
        tensors = {n: np.ascontiguousarray(hf_tensor(by_name[n], flat, host_array), out_dtype)
                   for n in group}  # every process gathers: the collectives need all of them
        if main:
            write_safetensors(path / fname, tensors)
        del tensors
    if main:
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {n: f for f, g in zip(names, groups) for n in g}}
            (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = {**cfg.to_hf(model_type), "dtype": out_dtype.name}
        (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prefjax.save_hf")
    return path
