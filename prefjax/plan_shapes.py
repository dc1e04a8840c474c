"""What a config trains, as shapes only: the decoder from its config.json, the abstract batch,
and the model-FLOPs formula (for the TPU fit-check, `prefjax.plan`). Nothing here allocates.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from prefjax.losses.records import Algorithm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.model field -> decoder config field (model-structure options, not in config.json)
LAYER_OPTIONS = {"scan_layers": "scan_layers", "remat_policy": "remat_policy",
                 "attention": "attention_impl"}


def model_folder(c: ConfigDict) -> str | None:
    """The HF folder whose config.json gives the policy's shape, or None for the tiny model.

    `model.init_from` wins over `model.source` (as in training); a run's workdir stands for its
    exported policy (`workdir/export`)."""
    src = c.model.init_from or c.model.source
    if src == "tiny":
        return None
    exported = Path(src) / "export"
    return str(exported) if (exported / "config.json").is_file() else src


def tiny_hf_config(c: ConfigDict) -> dict[str, Any]:
    """The config.json an HF export of the `model.source == "tiny"` model would carry."""
    m = c.model
    v = m.vocab_size
    if not v:
        from prefjax.data import synthetic as syn

        v = len(syn.make_tokenizer())  # training takes the synthetic tokenizer's size too
    if m.arch == "llama":
        return dict(model_type="llama", vocab_size=v, hidden_size=m.hidden_size,
                    intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                    num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                    max_position_embeddings=m.max_position_embeddings)
    if m.arch == "gpt2":
        return dict(model_type="gpt2", vocab_size=v, n_embd=m.hidden_size, n_layer=m.num_layers,
                    n_head=m.num_heads, n_inner=m.intermediate_size,
                    n_positions=m.max_position_embeddings)
    raise ValueError(f"model.arch must be 'llama' or 'gpt2', got {m.arch!r}")


def hf_config(c: ConfigDict) -> tuple[dict[str, Any], str]:
    """`(config.json dict, where it came from)` of the policy."""
    folder = model_folder(c)
    if folder is None:
        return tiny_hf_config(c), "config.model (tiny)"
    from prefjax.models.hf import read_config

    f = Path(folder)
    if f.suffix == ".json" and f.is_file():  # a bare config.json (e.g. configs/shapes/*.json)
        try:
            return json.loads(f.read_text()), str(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: invalid JSON ({e})") from e
    return read_config(f), str(f / "config.json")


def decoder_config(c: ConfigDict, d: dict[str, Any], where: str):
    """`(architecture hooks module, decoder config)` with the config's layer options applied."""
    from prefjax.models.hf import CheckpointError, architecture

    arch = architecture(d.get("model_type"), where)
    try:
        cfg = arch.config_from_hf(d)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {type(e).__name__}: {e}") from e
    names = {f.name for f in dataclasses.fields(cfg)}
    opts = {ours: c.model[field] for field, ours in LAYER_OPTIONS.items()
            if field in c.model and ours in names}
    return arch, dataclasses.replace(cfg, **opts)


def decoder_fn(c: ConfigDict) -> tuple[Callable[[nnx.Rngs], nnx.Module], Any, str]:
    """`(rngs -> decoder, decoder config, source)`: the policy exactly as training builds it
    (compute dtype `model.dtype`, float32 weights, `model.remat` and the layer options)."""
    d, where = hf_config(c)
    arch, cfg = decoder_config(c, d, where)
    if c.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {c.model.dtype!r}")
    dtype = DTYPES[c.model.dtype]

    def make(rngs: nnx.Rngs) -> nnx.Module:
        return arch.build(cfg, rngs, dtype, jnp.float32, c.model.remat)

    return make, cfg, where


def sequence_rows(c: ConfigDict, rec: Algorithm) -> tuple[int, int, str | None]:
    """`(rows, tail rows m, tail key)` of one global batch: 2 x train.batch_size for pairs
    (chosen, then rejected), train.batch_size for sequences, plus the record's extra rows."""
    hp = c.loss.to_dict()
    n = c.train.batch_size
    rows = 2 * n if rec.data == "pairs" else n
    tail = rec.tail_key(hp)
    m = c[rec.extra_rows.section].samples_per_batch if tail else 0
    return rows + m, m, tail


def abstract_batch(c: ConfigDict, rec: Algorithm, *, ref_column: bool) -> dict:
    """The global batch of the train step as ShapeDtypeStructs (typing.py's keys).

    input_ids / attention_mask / loss_mask int32 [B, data.max_length]; ref_logps float32 [B]
    when the reference is precomputed (`ref_column`); the tail flag float32 [m] (MPO).
    """
    if rec.online:
        raise NotImplementedError(
            f"algo {c.algo!r} is online: its step trains on rollouts (sampling is not part of "
            "the compiled train step); the fit-check covers offline algorithms")
    b, m, tail = sequence_rows(c, rec)
    t = c.data.max_length
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens}
    if ref_column:
        batch["ref_logps"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    if tail:
        batch[tail] = jax.ShapeDtypeStruct((m,), jnp.float32)
    return batch


def _named(params: Any) -> list[tuple[tuple, tuple]]:
    """`(logical names, shape)` of every Variable of `params`."""
    out = []
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(v, nnx.Variable):
            names = v.get_metadata().get("out_sharding") or ()
            out.append((tuple(names), tuple(v.get_value().shape)))
    return out


def matmul_params(params: Any) -> int:
    """Parameters that take part in a matmul per token: all but the lookup tables (token and
    position embeddings, logical names `("vocab", ...)` / `("pos", ...)`), except that a token
    table with no separate output projection (`("embed", "vocab")`) is the tied unembedding."""
    named = _named(params)
    tables = [math.prod(s) for n, s in named if len(s) == 2 and n and n[0] in ("vocab", "pos")]
    tied = [math.prod(s) for n, s in named if len(s) == 2 and n and n[0] == "vocab"]
    has_head = any(n[-2:] == ("embed", "vocab") for n, _ in named if len(n) >= 2)
    return count(params) - sum(tables) + (0 if has_head else sum(tied))


def count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def model_flops(*, matmul_params: int, tokens: int, seq: int, layers: int, attn_width: int,
                backward: bool) -> float:
    """Model FLOPs of one pass over `tokens` tokens in rows of `seq` (PaLM, appendix B).

    Per token: 2 N (each matmul weight: one multiply-add) plus 4 L t (h d_h) for QK^T and AV
    over the full t x t score matrix (no causal halving); a training step (forward + backward)
    is 3x that: 6 N + 12 L t h d_h. Rematerialisation is not model FLOPs and is not counted.
    """
    per_token = 2 * matmul_params + 4 * layers * seq * attn_width
    return float((3 if backward else 1) * per_token * tokens)


def attention_dims(cfg: Any) -> tuple[int, int]:
    """`(layers, query heads x head dim)` of a decoder config."""
    heads = cfg.num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_layers, heads * head_dim
