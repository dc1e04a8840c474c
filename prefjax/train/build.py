"""From a config to the pieces a trainer wires together: mesh, optimizer, tokenizer, model, data.

Each function reads one section of the config (see `prefjax/config.py`) and returns plain
objects, so notebooks and tests can build any piece on its own.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.data import (
    load_preference_data,
    tokenize_dataset,
    unpaired,
)
from prefjax.data import synthetic as syn
from prefjax.paths import as_path

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# which normalised data format each data kind needs
KIND_FORMATS = {"pairs": ("pairwise", "hh", "conversational"), "sequences": ("completion",),
                "prompts": ("prompt_only", "pairwise", "hh", "conversational", "completion"),
                "unpaired": ("unpaired",)}
KIND_FORMATS["sft"] = KIND_FORMATS["sequences"]  # the old name of the sequences kind


def mesh_and_rules(c: ConfigDict):
    """`(Mesh, Rules)` from `config.mesh` (axes data/fsdp/tensor, strategy)."""
    return parallel.make_mesh(c.mesh), parallel.rules_for(c.mesh.strategy)


# HF Trainer's `get_decay_parameter_names`: biases and norm weights are not decayed; prefjax's
# norm modules are `*norm` (Llama: attn_norm, mlp_norm, norm) and `ln_*` (GPT-2: ln_1, ln_2, ln_f)
_NO_DECAY_MODULE = re.compile(r"norm|^ln(_|$)", re.IGNORECASE)
WEIGHT_DECAY_MASKS = ("hf", "all")


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def decays(path: tuple) -> bool:
    """Whether the parameter at pytree `path` is decayed under the "hf" mask: not a bias (last
    name "bias") and not inside a norm module (a name matching `norm` or `ln_*`). Embeddings,
    the LM head and every kernel are decayed, as in HF Trainer."""
    names = [_key_name(k) for k in path if not isinstance(k, jax.tree_util.SequenceKey)]
    names = [n for n in names if n != "value"]  # nnx.Variable's own field
    if names and names[-1] == "bias":
        return False
    return not any(_NO_DECAY_MODULE.search(n) for n in names[:-1])


def weight_decay_mask(params):
    """`params` pytree -> same tree of bools: True where "hf" weight decay applies (`decays`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(t: ConfigDict) -> optax.GradientTransformation:
    """Optimizer of `config.train`: linear warmup then constant or cosine, inside
    `inject_hyperparams` so the learning rate is logged. Clipping is done by the step.

    adamw: `train.b1`, `b2`, `weight_decay` (decoupled, times the learning rate as in torch and
    optax), applied per `train.weight_decay_mask`: "hf" (default, HF Trainer's rule: no decay on
    biases and LayerNorm/RMSNorm weights, embeddings decayed; see `decays`) or "all" (every
    parameter, optax's own default). `train.moment_dtype` "bfloat16" keeps AdamW's two moments
    in bf16 (stochastically rounded, see `prefjax.train.moments`); "float32" (default) is
    `optax.adamw` itself.
    sgd: `train.momentum` (default 0: plain SGD, the default of torch.optim.SGD and optax.sgd;
    b1/b2 are not read). rmsprop: optax's defaults. Neither decays weights, so a non-zero
    `weight_decay` (or, off sgd, `momentum`) is an error rather than silently ignored.
    """
    if t.lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {t.lr}")
    if t.schedule == "constant":
        after = optax.constant_schedule(t.lr)
    elif t.schedule == "cosine":
        after = optax.cosine_decay_schedule(t.lr, max(t.num_steps - t.warmup_steps, 1))
    else:
        raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {t.schedule!r}")
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, t.lr, t.warmup_steps), after], [t.warmup_steps]
    ) if t.warmup_steps > 0 else after
    from prefjax.train.moments import adamw

    moments = t.get("moment_dtype", "float32")
    if moments not in DTYPES:
        raise ValueError(f"train.moment_dtype must be one of {list(DTYPES)}, got {moments!r}")
    if moments != "float32" and t.optimizer != "adamw":
        raise ValueError(f"train.moment_dtype={moments!r} is only supported with "
                         f"train.optimizer='adamw', got {t.optimizer!r}")
    momentum = float(t.get("momentum", 0.0))
    if momentum and t.optimizer != "sgd":
        raise ValueError(f"train.momentum={momentum} is read only by train.optimizer='sgd' "
                         f"(got {t.optimizer!r}; AdamW's first-moment decay is train.b1)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"train.momentum must be in [0, 1), got {momentum}")
    if t.weight_decay and t.optimizer != "adamw":
        raise ValueError(f"train.weight_decay={t.weight_decay} is applied only by "
                         f"train.optimizer='adamw', got {t.optimizer!r}; set it to 0")
    mask_name = t.get("weight_decay_mask", "hf")
    if mask_name not in WEIGHT_DECAY_MASKS:
        raise ValueError(f"train.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got "
                         f"{mask_name!r}")
    # no mask without decay: the optimizer state keeps the structure it always had
    mask = weight_decay_mask if t.weight_decay and mask_name == "hf" else None
    makers = {
        "adamw": lambda learning_rate: adamw(
            learning_rate, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
            moment_dtype=DTYPES[moments], mask=mask),
        "rmsprop": lambda learning_rate: optax.rmsprop(learning_rate),
        "sgd": lambda learning_rate: optax.sgd(learning_rate, momentum=momentum or None),
    }
    if t.optimizer not in makers:
        raise ValueError(f"train.optimizer must be one of {list(makers)}, got {t.optimizer!r}")
    return optax.inject_hyperparams(makers[t.optimizer])(learning_rate=sched)


def export_dir(workdir: str | os.PathLike) -> Path:
    """Where a run writes its final policy as an HF folder (`save_hf`)."""
    return as_path(workdir) / "export"


def hf_folder(path: str) -> str:
    """What `from_pretrained` should read for `path`: a run's workdir stands for its exported
    policy, so configs can name the run; anything else is already an HF folder/name."""
    exported = export_dir(path)
    return str(exported) if (exported / "config.json").exists() else path


def init_source(c: ConfigDict) -> str:
    """The HF folder the policy starts from, or "tiny" for a random init from `config.model`."""
    if c.model.init_from:
        return hf_folder(c.model.init_from)
    return c.model.source if c.model.source != "tiny" else "tiny"


def load_tokenizer(c: ConfigDict):
    """The synthetic task's tokenizer, or the one stored with the HF model."""
    src = init_source(c)
    if src == "tiny":
        if c.data.source != "synthetic":
            raise ValueError("model.source='tiny' has no tokenizer of its own; it only works with "
                             "data.source='synthetic' (or set model.source to an HF folder)")
        return syn.make_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise OSError(f"no tokenizer found for model {src!r} (a local folder with tokenizer "
                      f"files, or a hub name when online): {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_ids(tokenizer, folder: str | os.PathLike | None = None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's eos_token_id first, then the
    `eos_token_id` (an int or a list) of the model folder's generation_config.json, or of its
    config.json when it has none (what HF `generate` stops at; Llama-3-Instruct lists 128001 and
    128009). `folder`: the HF model folder (`init_source(c)`; None or "tiny": tokenizer only)."""
    import json

    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if folder is not None and str(folder) != "tiny":
        for name in ("generation_config.json", "config.json"):
            f = Path(folder) / name
            if f.exists():
                e = json.loads(f.read_text()).get("eos_token_id")
                ids += [int(x) for x in (e if isinstance(e, list) else [] if e is None else [e])]
                break
    if not ids:
        raise ValueError(f"no EOS id: the tokenizer has no eos_token and {folder!r} names none "
                         "in generation_config.json / config.json")
    return tuple(dict.fromkeys(ids))  # unique, tokenizer's first


def decoder_fn(c: ConfigDict, tokenizer, *, mesh=None, rules=None
               ) -> Callable[[nnx.Rngs], nnx.Module] | nnx.Module:
    """The policy decoder: a function of rngs (random tiny init) or a loaded module (HF folder;
    with `mesh`, each parameter is read straight into its sharding by `rules`)."""
    dtype = DTYPES[c.model.dtype]
    src = init_source(c)
    if src != "tiny":
        from prefjax.models.hf import load_hf

        model, _ = load_hf(src, dtype=dtype, remat=c.model.remat, tokenizer=False, mesh=mesh,
                           rules=rules, config_overrides=layer_options(c))
        return model
    m = c.model
    v = m.vocab_size or len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, **layer_options(c))
    if m.arch == "llama":
        from prefjax.models.llama import Llama, LlamaConfig

        cfg = LlamaConfig(vocab_size=v, hidden_size=m.hidden_size,
                          intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                          num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                          max_position_embeddings=m.max_position_embeddings, **ids)
        return lambda rngs: Llama(cfg, rngs=rngs, dtype=dtype, remat=m.remat)
    if m.arch == "gpt2":
        from prefjax.models.gpt2 import GPT2, GPT2Config

        cfg = GPT2Config(vocab_size=v, hidden_size=m.hidden_size, num_layers=m.num_layers,
                         num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                         max_position_embeddings=m.max_position_embeddings, **ids)
        return lambda rngs: GPT2(cfg, rngs=rngs, dtype=dtype, remat=m.remat)
    raise ValueError(f"model.arch must be 'llama' or 'gpt2', got {m.arch!r}")


def layer_options(c: ConfigDict) -> dict:
    """The decoder config fields (LlamaConfig / GPT2Config) that `config.model` sets beyond the
    checkpoint's shape: scanned layers, remat policy, attention implementation."""
    from prefjax.models import attention
    from prefjax.models.llama import REMAT_POLICIES

    m = c.model
    out = dict(scan_layers=m.get("scan_layers", False),
               remat_policy=m.get("remat_policy", "none"), attention_impl=m.get("attention", "xla"))
    if out["remat_policy"] not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got "
                         f"{out['remat_policy']!r}")
    if out["attention_impl"] not in attention.IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {attention.IMPLEMENTATIONS}, got "
                         f"{out['attention_impl']!r}")
    return out


def materialize(decoder, seed: int) -> nnx.Module:
    """`decoder_fn`'s result as a module: a loaded one as is, a random one initialised at `seed`."""
    return decoder if isinstance(decoder, nnx.Module) else decoder(nnx.Rngs(seed))


def reference_module(c: ConfigDict, decoder, *, mesh=None, rules=None) -> nnx.Module:
    """The frozen reference: `reference.source` (HF folder / run workdir) or the initial policy.

    Without `reference.source` a loaded `decoder` is returned itself, not a copy: a caller that
    also trains it as the policy must `nnx.clone` it when `ref is policy`, or the reference moves.
    A loaded reference is read straight into its shardings with `mesh` (and kept in
    `reference.param_dtype` when that is set, never widened first).
    """
    if c.reference.source:
        from prefjax.models.hf import load_hf

        kw = {}
        if c.reference.get("param_dtype", ""):
            kw["param_dtype"] = DTYPES[c.reference.param_dtype]
        ref, _ = load_hf(hf_folder(c.reference.source), dtype=DTYPES[c.model.dtype],
                         tokenizer=False, mesh=mesh, rules=rules, **kw)
        return ref
    return materialize(decoder, c.seed)


def load_data(c: ConfigDict, tokenizer, kind: str):
    """`(train, eval)` tokenized datasets of `kind` ("pairs" | "sequences" | "prompts"; "sft"
    is an old name of "sequences"): an algorithm record's data kind.

    Synthetic: generated from `data.num_train` / `data.num_eval` with held-out seeds. Files:
    `data.source` (and `data.eval_source`, else an `eval_fraction` split by the run's seed).
    """
    d = c.data
    if d.source == "synthetic":
        make = {"pairs": lambda n, s: syn.make_preference_dataset(n, s, labeling=d.labeling),
                "sequences": syn.make_sft_dataset, "sft": syn.make_sft_dataset,
                "prompts": syn.make_prompt_dataset,
                "unpaired": lambda n, s: unpaired.make_unpaired_dataset(n, s, d.labeling)}[kind]
        train, held = make(d.num_train, c.seed), make(d.num_eval, c.seed + 10_000)
    else:
        train = load_preference_data(d.source, format=d.format, on_bad_row=d.on_bad_row)
        if d.eval_source:
            held = load_preference_data(d.eval_source, format=d.format, on_bad_row=d.on_bad_row)
        else:
            split = train.train_test_split(test_size=d.eval_fraction, seed=c.seed)
            train, held = split["train"], split["test"]
    from prefjax.data.preference import dataset_format

    for name, ds in (("data.source", train), ("data.eval_source", held)):
        try:
            fmt = dataset_format(ds)
        except ValueError:
            continue  # a split keeps the rows but not the description; the source was checked
        if fmt not in KIND_FORMATS[kind]:
            raise ValueError(f"{name}: format {fmt!r} cannot feed a {kind!r} trainer "
                             f"(algo {c.algo!r}); it needs one of {KIND_FORMATS[kind]}")
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              max_response_length=d.max_response_length, over_long=d.over_long)
    train, _ = tokenize_dataset(train, tokenizer, **kw)
    held, _ = tokenize_dataset(held, tokenizer, **kw)
    if kind == "unpaired":  # the mismatched rows of each block of batch_size rows (KL estimate)
        train, held = (unpaired.with_kl_completions(ds, c.train.batch_size)
                       for ds in (train, held))
    return train, held
