"""Per-token implicit rewards of a preference-trained policy (token-level credit assignment).

In the token-level MDP view of DPO ("From r to Q*", Rafailov et al. 2024) each response token
gets the implicit reward

    r_t = beta * (log pi(y_t | s_t) - log pi_ref(y_t | s_t)),    s_t = (x, y_<t),

and the sum of r_t over a response is the sequence reward beta * log pi(y|x) / pi_ref(y|x) that
DPO trains on. `token_rewards` computes them for a batch in the `prefjax/typing.py` layout
(columns aligned with `input_ids`, 0 off the loss mask and on padding); `load_run` gives the
policy and reference of any trained workdir to feed it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.lm import token_logps

Array = jax.Array


def token_rewards_from_logps(policy_token_logps: Array, ref_token_logps: Array,
                             loss_mask: Array, beta: float | Array) -> Array:
    """beta * (policy - reference) token log-probs [b, t] float32, 0 where loss_mask is 0."""
    r = jnp.asarray(beta, jnp.float32) * (policy_token_logps.astype(jnp.float32)
                                          - ref_token_logps.astype(jnp.float32))
    return jnp.where(loss_mask.astype(bool), r, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef", "chunk_size"))
def _token_rewards(graphdef, state, ref_graphdef, ref_state, ids, mask, loss_mask, beta,
                   chunk_size):
    # one module-level jit: the compiled program is cached per (models' graphdefs, shapes,
    # chunk_size); beta is traced, so a new beta reuses it
    lp = token_logps(nnx.merge(graphdef, state), ids, mask, chunk_size=chunk_size)
    lr = token_logps(nnx.merge(ref_graphdef, ref_state), ids, mask, chunk_size=chunk_size)
    # padding is never scored, whatever loss_mask says there
    return token_rewards_from_logps(lp, lr, loss_mask.astype(bool) & mask.astype(bool), beta)


def token_rewards(policy: nnx.Module, reference: nnx.Module, batch: Mapping[str, object], *,
                  beta: float, chunk_size: int | None = None) -> Array:
    """Per-token implicit rewards [b, t] float32 of `batch` under `policy` vs `reference`.

    batch: `input_ids`, `attention_mask` [b, t] and optionally `loss_mask` [b, t] (default: the
    attention mask), left or right padded; other keys are ignored. Column t holds
    beta * (log pi(ids[t] | ids[:t]) - log pi_ref(ids[t] | ids[:t])) where loss_mask is 1 and
    the token and its predecessor are real, else 0; summed over a row it is
    beta * (logps - ref_logps) of `prefjax.lm.sequence_logps`. `chunk_size` chunks the
    vocabulary log-softmax as in `prefjax.lm` (None: unchunked). Jitted once per shape.
    """
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise KeyError(f"token_rewards: batch needs 'input_ids' and 'attention_mask', got keys "
                       f"{sorted(batch)}")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    loss = jnp.asarray(batch.get("loss_mask", mask), jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"token_rewards: batch['input_ids'] must be [b, t], got shape "
                         f"{ids.shape}")
    for name, x in (("attention_mask", mask), ("loss_mask", loss)):
        if x.shape != ids.shape:
            raise ValueError(f"token_rewards: batch[{name!r}] has shape {x.shape}, expected "
                             f"input_ids' {ids.shape}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"token_rewards: chunk_size must be a positive int or None, got "
                         f"{chunk_size}")
    graphdef, state = nnx.split(policy)
    ref_graphdef, ref_state = nnx.split(reference)
    return _token_rewards(graphdef, state, ref_graphdef, ref_state, ids, mask, loss,
                          jnp.float32(beta), chunk_size)


def reference_source(config: Mapping) -> str:
    """Where a run's reference comes from, as `prefjax.train.build` resolves it: its
    `reference.source`, else the initial policy (`model.init_from`, else `model.source`);
    "tiny" when that is a random init (rebuilt from the config at its seed)."""
    model = config.get("model", {})
    return (config.get("reference", {}).get("source") or model.get("init_from")
            or model.get("source") or "tiny")


def load_run(workdir: str | os.PathLike, *, reference: str | None = None,
             dtype=jnp.float32, step: int | None = None
             ) -> tuple[nnx.Module, nnx.Module, dict]:
    """(policy, reference, config dict) of a trained run directory, for `token_rewards`.

    The policy is the run's export (`workdir/export`, written when `train.export_hf` is on);
    with `step=` (or when there is no export) it is restored from the run's checkpoint of that
    step (None: the latest) instead, e.g. to look at a run mid-training.
    The reference is `reference` if given (an HF folder or a run workdir, which stands for its
    export), else `reference_source(config)`; a random-init reference ("tiny") is rebuilt from
    the config at its seed, as the trainer built it. Both load in `dtype` (default float32).
    """
    from prefjax.config import base_config
    from prefjax.models.hf import load_hf
    from prefjax.paths import as_path
    from prefjax.train import build

    wd = as_path(workdir)
    cfg_file = wd / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: is {wd} a prefjax run directory?")
    config = json.loads(cfg_file.read_text())
    export = build.export_dir(wd)
    if step is None and (export / "config.json").exists():
        policy, _ = load_hf(export, dtype=dtype, tokenizer=False)
    elif (wd / "checkpoints").exists():
        policy = checkpoint_policy(wd, _merged(base_config(), config), step)
    else:
        raise FileNotFoundError(f"{wd} holds neither an exported policy ({export}/config.json, "
                                "written with train.export_hf = True) nor checkpoints/")
    src = reference or reference_source(config)
    if src == "tiny":
        # the run's fields over today's defaults, so a config.json written before a field
        # existed still builds
        c = _merged(base_config(), config)
        ref = build.materialize(build.decoder_fn(c, build.load_tokenizer(c)), c.seed)
        return policy, ref, config
    folder = build.hf_folder(str(src))
    try:
        ref, _ = load_hf(folder, dtype=dtype, tokenizer=False)
    except Exception as e:
        raise FileNotFoundError(
            f"{cfg_file}: cannot load the reference {src!r} (reference.source / model.init_from "
            f"/ model.source, or the `reference` argument): {e}") from e
    return policy, ref, config


def checkpoint_policy(workdir, c, step: int | None = None) -> nnx.Module:
    """The policy of checkpoint `step` (None: the latest) of the run of config `c` in `workdir`,
    restored into the structure the pipeline trained (a live reference, when the run had one,
    is rebuilt from its source as on resume; a value head is dropped)."""
    from prefjax.losses import records
    from prefjax.paths import as_path
    from prefjax.pipeline import models
    from prefjax.train import build
    from prefjax.train.checkpoint import Checkpointer
    from prefjax.train.state import merge_model

    rec = records.get(c.algo)
    tokenizer = build.load_tokenizer(c)
    mesh, rules = build.mesh_and_rules(c)
    decoder = build.decoder_fn(c, tokenizer, mesh=mesh, rules=rules)
    live = None
    if (not rec.online and c.reference.mode == "live"
            and rec.needs_reference(c.loss.to_dict())):
        live = models.reference_model(c, decoder, mesh=mesh, rules=rules)
    tr = models.trainee(c, rec, decoder, optimizer=build.make_optimizer(c.train), mesh=mesh,
                        rules=rules, live_reference=live)
    with Checkpointer(as_path(workdir) / "checkpoints", frozen=tr.frozen) as ck:
        state, _ = ck.restore(step, abstract_state=tr.abstract, shardings=tr.shardings,
                              frozen_rest=tr.frozen_rest() if tr.frozen_rest else None)
    return models.export_model(merge_model(state))


def _merged(c, values: Mapping):
    """ConfigDict `c` with `values` (a nested dict) written over it, recursively."""
    for k, v in values.items():
        if isinstance(v, Mapping) and k in c and hasattr(c[k], "items"):
            _merged(c[k], v)
        else:
            c[k] = v
    return c


def response_slices(loss_mask) -> list[slice]:
    """Per row of a [b, t] loss mask, the slice of its scored columns (first to last 1)."""
    m = np.asarray(loss_mask).astype(bool)
    out = []
    for row in m:
        on = np.flatnonzero(row)
        out.append(slice(int(on[0]), int(on[-1]) + 1) if len(on) else slice(0, 0))
    return out
