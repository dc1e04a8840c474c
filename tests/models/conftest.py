"""`zoo`: the tiny decoders the model tests share, each beside its HF reference."""

from __future__ import annotations

import pytest

from prefjax.models.hf import load_hf
from tests.models.hf_fixtures import GPT2_VARIANTS, from_torch, make_hf_model, make_tiny_checkpoint


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """`name -> (hf, model)` for a name of `GPT2_VARIANTS` or `LLAMA_KINDS`, built on first use.

    GPT-2 goes through a checkpoint folder and `load_hf` (hf: the folder), so its tests also
    cover loading; the Llama family takes the torch weights directly (hf: the torch model).
    """
    made = {}

    def get(name):
        if name not in made:
            if name in GPT2_VARIANTS:
                path = make_tiny_checkpoint("gpt2", tmp_path_factory.mktemp(name),
                                            **GPT2_VARIANTS[name])
                made[name] = (path, load_hf(path, tokenizer=False)[0])
            else:
                hf = make_hf_model(name)
                made[name] = (hf, from_torch(hf))
        return made[name]

    return get
