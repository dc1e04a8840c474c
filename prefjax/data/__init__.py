"""Preference data: loading, validation, tokenization, collation, batching, the synthetic task."""

from prefjax.data.loader import BatchLoader
from prefjax.data.preference import (
    FORMATS,
    BadRowError,
    LoadReport,
    dataset_format,
    dataset_source,
    detect_format,
    load_preference_data,
    prepare_preference_data,
)
from prefjax.data.reference import add_reference_logps
from prefjax.data.tokenize import (
    TokenizeReport,
    TruncationPolicy,
    apply_policy,
    bos_prefix,
    collate_pairs,
    collate_prompts,
    collate_sequences,
    encode_row,
    tokenize_dataset,
)

__all__ = [
    "FORMATS",
    "BadRowError",
    "BatchLoader",
    "LoadReport",
    "TokenizeReport",
    "TruncationPolicy",
    "add_reference_logps",
    "apply_policy",
    "bos_prefix",
    "collate_pairs",
    "collate_prompts",
    "collate_sequences",
    "dataset_format",
    "dataset_source",
    "detect_format",
    "encode_row",
    "load_preference_data",
    "prepare_preference_data",
    "tokenize_dataset",
]
