"""A verifiable-reward task on the synthetic language: answer the prompt exactly.

The prompts are the synthetic task's (`op s_1 .. s_k =`, prefjax.data.synthetic), and so is the
solution t(x) (the symbols copied, reversed or shifted). Where r* grades a response,
`exact_match` only verifies it: 1 when the response is exactly t(x) followed by `<eos>`, else 0,
the binary, checkable reward GRPO-style methods are built for (a reference-policy sample solves
14% of prompts). It is a plain Python function of token ids, so a config names it:

    online.reward = "prefjax.data.verifiable:exact_match"

Any `module:function` with the signature `(prompt_ids [b, p], tokens [b, n]) -> scores [b]`
works the same way (prefjax.pipeline.rewards): prompts left-padded, tokens as the sampler returns
them (pad after the first EOS).
"""

from __future__ import annotations

import numpy as np

from prefjax.data import synthetic as syn


def solution(prompt_ids) -> list[int]:
    """t(x) as token ids, for one prompt's ids (any padding, BOS ignored)."""
    words = [syn.VOCAB[i] for i in np.asarray(prompt_ids).tolist() if 0 <= i < len(syn.VOCAB)]
    return [syn.TOKEN_ID[w] for w in syn.target(words)]


def exact_match(prompt_ids, tokens) -> np.ndarray:
    """1.0 where a sampled response is exactly t(x) then `<eos>`, else 0.0: float32 [b].
    Runs on the host (NumPy): it reads the arrays of one process."""
    p, y = np.asarray(prompt_ids), np.asarray(tokens)
    if p.ndim != 2 or y.ndim != 2 or len(p) != len(y):
        raise ValueError(f"exact_match: expected prompt_ids [b, p] and tokens [b, n], got shapes "
                         f"{p.shape} and {y.shape}")
    out = np.zeros(len(y), np.float32)
    for i in range(len(y)):
        want = solution(p[i]) + [syn.EOS_ID]
        out[i] = float(y[i, :len(want)].tolist() == want)
    return out
