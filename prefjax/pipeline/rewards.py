"""Scoring sampled responses: the synthetic task's oracle r* or a reward model, as one function
`(prompt_ids [b, p], tokens [b, n], rows) -> scores [b]` that reads the sampler's true rows."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from prefjax.data import synthetic as syn
from prefjax.sampling import training_rows
from prefjax.train import build


def is_named_callable(spec: str) -> bool:
    """`online.reward` names a function as `module:function` (not an existing folder)."""
    return ":" in spec and not Path(spec).exists() and "/" not in spec.partition(":")[0]


def named_callable(spec: str) -> Callable:
    """The function `module:function` (e.g. `prefjax.data.verifiable:exact_match`), imported;
    fails naming the spec when the module or the attribute is missing or not callable."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"online.reward={spec!r}: cannot import {name!r} from {module!r} "
                         f"({e})") from e
    if not callable(fn):
        raise ValueError(f"online.reward={spec!r} is not callable")
    return fn


def reward_function(c: ConfigDict, *, mesh=None, rules=None) -> Callable:
    """`(prompt_ids [b, p] left-padded, tokens [b, n], rows) -> scores [b]`: the oracle r*, a
    reward model (`online.reward`), each one jitted call, or a named Python/JAX function
    `module:function` of `(prompt_ids, tokens) -> [b]` (e.g. a verifier,
    prefjax.data.verifiable). `rows` are the training rows of the
    prompts and samples (`prefjax.eval.scoring_rows`); a reward model reads only them. With a
    mesh, the reward model's parameters are placed on it by `rules`."""
    if c.online.reward == "oracle":
        if c.data.source != "synthetic":
            raise ValueError("online.reward='oracle' is the synthetic task's ground truth; with "
                             f"data.source={c.data.source!r} set online.reward to a reward model "
                             "folder (a reward-model run's workdir or its export)")
        oracle = jax.jit(syn.reward_of_samples)
        return lambda prompt_ids, tokens, rows: oracle(prompt_ids, tokens)
    if is_named_callable(c.online.reward):
        fn = named_callable(c.online.reward)
        return lambda prompt_ids, tokens, rows: jnp.asarray(fn(prompt_ids, tokens), jnp.float32)
    from prefjax.models.heads import HEAD_FILE, RewardModel

    folder = build.hf_folder(c.online.reward)
    if not (Path(folder) / HEAD_FILE).exists():
        raise FileNotFoundError(f"online.reward={c.online.reward!r}: no {HEAD_FILE} in {folder}; "
                                "point it at a reward-model run (configs/rm_synthetic.py)")
    rm = RewardModel.from_hf(folder, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    if mesh is not None:  # kept in reference.param_dtype, like the reference
        from prefjax.pipeline.models import frozen

        rm = frozen(rm, c, mesh=mesh, rules=rules)
    graphdef, st = nnx.split(rm)
    f = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
    return lambda prompt_ids, tokens, rows: f(st, rows["input_ids"], rows["attention_mask"])


def eval_reward_fn(c: ConfigDict, tokenizer, reward_fn: Callable | None = None) -> Callable:
    """`(prompt_ids, tokens) -> [b]` from `reward_function`, rebuilding the rows from
    `prompt_ids != pad` and the first of the EOS ids (`build.eos_ids`). Kept for callers of
    the two-argument form (`prefjax.eval.sample_metrics(reward_fn=...)`); it cannot see a
    prompt token equal to the pad id (pad = EOS tokenizers), so the pipeline passes
    `reward_function` as `scorer`."""
    reward_fn = reward_fn or reward_function(c)
    pad, eos = tokenizer.pad_token_id, build.eos_ids(tokenizer, build.init_source(c))
    return lambda p, t: reward_fn(p, t, _rows(p, t, pad, eos))


@functools.partial(jax.jit, static_argnames=("pad_id", "eos_id"))
def _rows(prompt_ids, tokens, pad_id, eos_id: int | tuple[int, ...]):
    from prefjax.sampling import Samples

    tokens = jnp.asarray(tokens)
    eos = jnp.isin(tokens, jnp.asarray(eos_id))
    mask = (jnp.cumsum(eos, axis=1) - eos == 0).astype(jnp.int32)
    s = Samples(tokens, mask, jnp.zeros(mask.shape, jnp.float32), mask.sum(1))
    prompt_mask = (jnp.asarray(prompt_ids) != pad_id).astype(jnp.int32)
    return training_rows(prompt_ids, prompt_mask, s, pad_id=pad_id)
