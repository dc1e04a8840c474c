"""Test helpers: tiny random HF checkpoints (transformers + torch, seeded) and a tiny tokenizer.

`make_tiny_checkpoint(kind, path)` writes config.json + safetensors with `save_pretrained` and a
tokenizer beside them; `hf_logits` runs the saved folder (or a loaded torch model) with the
mask-derived position_ids prefjax uses. Weights are redrawn with a larger scale than HF's init
(and norms/biases made non-trivial) so that parity tests compare logits of order 1, where a
mapping mistake cannot hide. `from_torch` and `clone` build the prefjax side from those weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from prefjax.models import llama as L

LLAMA_KINDS = ("llama", "llama3_rope", "qwen2", "qwen2_tied", "mistral")  # prefjax's Llama class
KINDS = (*LLAMA_KINDS, "gpt2")
# name -> GPT-2 config overrides; the second covers the options the default leaves off
GPT2_VARIANTS = {"gpt2": {}, "gpt2_untied_scaled": dict(
    tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, n_inner=96)}
VOCAB = 160
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3

_LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0)


def hf_config(kind: str, **overrides) -> transformers.PretrainedConfig:
    """The transformers config of a tiny model of `kind` (see KINDS)."""
    if kind == "llama":
        return transformers.LlamaConfig(**{**_LLAMA_BASE, **overrides})
    if kind == "llama3_rope":
        # original context 64 with head_dim 16 puts RoPE frequencies in all three llama3 bands
        # (kept, blended, divided by factor), so every branch of the scaling is exercised.
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        kw = {**_LLAMA_BASE, "num_key_value_heads": 2, "rope_parameters": rope}
        return transformers.LlamaConfig(**{**kw, **overrides})
    if kind in ("qwen2", "qwen2_tied"):
        kw = {**_LLAMA_BASE, "num_key_value_heads": 2, "tie_word_embeddings": kind == "qwen2_tied"}
        return transformers.Qwen2Config(**{**kw, **overrides})
    if kind == "mistral":
        kw = {**_LLAMA_BASE, "num_key_value_heads": 2, "sliding_window": 5}
        return transformers.MistralConfig(**{**kw, **overrides})
    if kind == "gpt2":
        kw = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                  bos_token_id=1, eos_token_id=2)
        return transformers.GPT2Config(**{**kw, **overrides})
    raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")


def make_hf_model(kind: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 torch causal LM of `kind` with seeded, non-trivial random weights (eval mode)."""
    cfg = hf_config(kind, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)  # norms stay near 1 but differ per channel
            elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def make_tiny_checkpoint(kind: str, path, *, seed: int = 0, max_shard_size=None,
                         tokenizer: bool = True, dtype=torch.float32, **overrides) -> Path:
    """Write a tiny random HF checkpoint of `kind` into `path` (created) and return the path.

    `overrides` go to the transformers config (e.g. `sliding_window=4`); `max_shard_size`
    (e.g. "40KB") forces a sharded checkpoint with model.safetensors.index.json; `dtype`
    is the stored dtype.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_hf_model(kind, seed=seed, **overrides).to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kw)
    if tokenizer:
        make_tiny_tokenizer(path)
    return path


def make_tiny_tokenizer(path) -> Path:
    """Save a byte-level, character-granular fast tokenizer (101 ids, fits VOCAB) + chat template.

    Specials: <pad>=0, <s>=1 (bos), </s>=2 (eos), <unk>=3; then one id per printable ASCII byte,
    space, newline and tab (GPT-2 byte-level symbols), no merges. Byte-level on purpose: for some
    model types (qwen2, gpt2) transformers 5's AutoTokenizer rebuilds a byte-level BPE from the
    saved vocab, and this vocab tokenizes ASCII text identically either way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a", "\u0109"]  # space \n \t
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *symbols])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(path)
    return path


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """Mask-derived positions `clip(cumsum(mask) - 1, 0)` [b, t] int64 (what prefjax uses)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(model_or_path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 [b, t, v] logits of a torch model (or a saved folder) with mask-derived positions."""
    model = model_or_path
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_or_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(mask_positions(mask), dtype=torch.long))
    return out.logits.float().numpy()


def padded_batch(seed: int = 0, t: int = 16, vocab: int = VOCAB):
    """ids, mask [4, t]: full row, right-padded, left-padded (two lengths); pads hold id 0."""
    r = np.random.default_rng(seed)
    ids = r.integers(4, vocab, (4, t))
    mask = np.zeros((4, t), np.int64)
    mask[0] = 1
    mask[1, : t - 6] = 1  # right padding
    mask[2, 4:] = 1  # left padding
    mask[3, t - 7:] = 1  # left padding, short
    return (ids * mask).astype(np.int32), mask.astype(np.int32)


def from_torch(hf, **kw) -> L.Llama:
    """A prefjax Llama holding the torch model's weights (via the HF hooks, no files)."""
    cfg = L.config_from_hf(hf.config.to_dict())
    model = L.Llama(cfg, rngs=nnx.Rngs(0), **kw)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, L.params_from_hf(tensors, cfg)))
    nnx.update(model, state)
    return model


def clone(model: nnx.Module, **kw) -> nnx.Module:
    """Same weights, other construction options (dtype, remat, `config` fields); any decoder."""
    cfg = dataclasses.replace(model.config, **kw.pop("config", {}))
    other = type(model)(cfg, rngs=nnx.Rngs(1), **kw)
    nnx.update(other, nnx.state(model, nnx.Param))
    return other
