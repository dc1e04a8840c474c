"""Decoders (Flax NNX), their KV cache, and the Hugging Face checkpoint loader/saver."""

from prefjax.models.cache import KVCache
from prefjax.models.hf import CheckpointError, load_hf, save_hf
from prefjax.models.llama import Llama, LlamaConfig

__all__ = ["CheckpointError", "KVCache", "Llama", "LlamaConfig", "load_hf", "save_hf"]
