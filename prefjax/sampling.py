"""Batched generation with a KV cache under jit: temperature, top-k, top-p, greedy, per-row EOS.

Prompts arrive LEFT-padded (`prompt_ids`, `prompt_mask` [b, p], e.g. from
`prefjax.data.tokenize.collate_prompts`), so every row's last prompt token sits in column p - 1
and one prefill forward plus one-token decode steps serve the whole batch. The model is read
only through the interface `prefjax.lm` uses (`hidden_states(ids, mask, cache=)`, `unembed()`)
plus `init_cache(b, max_len, dtype)`, so Llama-family models, GPT-2 and `PolicyWithValue` work.

A `Sampler` fixes the static settings and keeps one compiled function per
(model structure, batch, bucketed prompt length); `sample(...)` is the same with cached Samplers.
Randomness comes only from the `key` passed in: step i draws with `fold_in(key, i)`, so equal
keys give equal samples (split a fresh key per call). Prompts are checked on the host, so call
a Sampler from Python, not inside another jit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax.parallel import DEFAULT_RULES, Rules, batch_sharding, logical_to_spec

Array = jax.Array


class Samples(NamedTuple):
    """What a `Sampler` returns; n = max_new_tokens.

    tokens:  int32 [b, n]  sampled ids; a row's EOS is kept (mask 1), every slot after it holds
                           `pad_id` (mask 0).
    mask:    int32 [b, n]  1 on generated tokens (a prefix of each row).
    logps:   float32 [b, n] log softmax(logits / temperature)[token] under the full
                           distribution: NOT renormalized over the top-k / top-p set the token was
                           drawn from (so at temperature 1 these are the policy's own log-probs).
                           Greedy uses the given temperature, or 1 when it is <= 0. 0 where mask
                           is 0.
    lengths: int32 [b]     number of generated tokens (sum of mask).
    """

    tokens: Array
    mask: Array
    logps: Array
    lengths: Array


def _decoder(model):
    """The module that owns `init_cache` and `config` (a value-head wrapper holds its decoder)."""
    return model if hasattr(model, "init_cache") else model.decoder


class Sampler:
    """Generation with fixed settings; `sampler(model, prompt_ids, prompt_mask, key) -> Samples`.

    max_new_tokens: n, the static number of new-token slots (rows stop early at EOS; the loop
        stops when every row has).
    temperature > 0 (any value with greedy), top_k (None or 0: off), top_p in (0, 1] (1: off):
        applied in that order, as HF does; top-k keeps exactly k tokens (`lax.top_k`).
    greedy: argmax instead of drawing (no key needed).
    eos_id: one id or several (any ends a row); None: never stop early.
    pad_id: what fills `tokens` after a row ends.
    mesh: `prefjax.parallel.make_mesh` mesh; rows split over ("data", "fsdp") when divisible,
        the KV cache too, its kv heads as `rules` place 'kv_heads' (default: over "tensor").
        Parameters are used where they live: pass a model whose params are already placed
        (e.g. `merge_model(train_state)`) so they are not moved on every call.
    prompt_multiple: left-pad the prompt length up to a multiple of this, so prompts of nearby
        lengths share one compiled function (outputs do not change: padding is masked).
    cache_dtype: KV cache dtype (default: the model's compute dtype).

    `traces` counts how often the generation function was traced (= compiled).
    """

    def __init__(self, *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, greedy: bool = False,
                 eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 prompt_multiple: int = 1, cache_dtype=None):
        if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}; "
                             "use greedy=True for argmax decoding")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if top_k is not None and (not isinstance(top_k, int | np.integer) or top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (0: off), got {top_k!r}")
        eos = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
        if any(e < 0 for e in eos):
            raise ValueError(f"eos_id must be non-negative token ids, got {eos_id!r}")
        if prompt_multiple < 1:
            raise ValueError(f"prompt_multiple must be >= 1, got {prompt_multiple!r}")
        self.max_new_tokens, self.greedy = int(max_new_tokens), bool(greedy)
        self.temperature = float(temperature) if temperature > 0 else 1.0
        self.top_k, self.top_p = int(top_k or 0), float(top_p)
        self.eos, self.pad_id, self.mesh, self.rules = eos, int(pad_id), mesh, rules
        self.prompt_multiple, self.cache_dtype = int(prompt_multiple), cache_dtype
        self.traces = 0
        self._jit = jax.jit(self._generate, static_argnums=0)

    def __call__(self, model: nnx.Module, prompt_ids, prompt_mask, key: Array | None = None
                 ) -> Samples:
        """Samples for left-padded `prompt_ids` / `prompt_mask` [b, p] (see the class doc)."""
        if key is None:
            if not self.greedy:
                raise ValueError("sampling needs a jax.random key (or greedy=True)")
            key = jax.random.key(0)
        if _spans_processes(prompt_ids, prompt_mask):
            return self._call_global(model, prompt_ids, prompt_mask, key)
        ids, mask = _check_prompts(prompt_ids, prompt_mask)
        p = -(-ids.shape[1] // self.prompt_multiple) * self.prompt_multiple
        if p > ids.shape[1]:  # extra left padding changes nothing but the compile key
            pad = ((0, 0), (p - ids.shape[1], 0))
            ids = np.pad(ids, pad, constant_values=self.pad_id)
            mask = np.pad(mask, pad)
        # the training rows built from the samples are p + n long and must fit the model too
        limit = getattr(_decoder(model).config, "max_position_embeddings", None)
        if limit is not None and p + self.max_new_tokens > limit:
            raise ValueError(
                f"prompt length {p} (after bucketing) + max_new_tokens {self.max_new_tokens} = "
                f"{p + self.max_new_tokens} exceeds the model's max_position_embeddings={limit}; "
                "shorten the prompts or lower max_new_tokens")
        ids, mask = ids.astype(np.int32), mask.astype(np.int32)
        graphdef, state = nnx.split(model)
        if self.mesh is None:
            return self._jit(graphdef, state, ids, mask, key)
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        sh = batch_sharding(self.mesh) if ids.shape[0] % rows == 0 else self._replicated()
        ids, mask = jax.device_put(ids, sh), jax.device_put(mask, sh)
        with jax.set_mesh(self.mesh):
            return self._jit(graphdef, state, ids, mask, jax.device_put(key, self._replicated()))

    def _call_global(self, model, ids: Array, mask: Array, key: Array) -> Samples:
        """Prompts that are global arrays over several processes (`parallel.global_batch`):
        each process checks its own rows; the arrays are used where they live."""
        if self.mesh is None:
            raise ValueError("prompts spread over several processes need Sampler(mesh=...)")
        for a, b in zip(ids.addressable_shards, mask.addressable_shards):
            _check_prompts(np.asarray(a.data), np.asarray(b.data))
        p = -(-ids.shape[1] // self.prompt_multiple) * self.prompt_multiple
        if p > ids.shape[1]:
            raise ValueError(f"global prompts of length {ids.shape[1]} need no bucketing: pad "
                             f"them to a multiple of prompt_multiple={self.prompt_multiple}")
        limit = getattr(_decoder(model).config, "max_position_embeddings", None)
        if limit is not None and p + self.max_new_tokens > limit:
            raise ValueError(
                f"prompt length {p} + max_new_tokens {self.max_new_tokens} exceeds the model's "
                f"max_position_embeddings={limit}; shorten the prompts or lower max_new_tokens")
        if not _spans_processes(key):  # the same key on every process, made one global array
            data = np.asarray(jax.random.key_data(key))
            key = jax.random.wrap_key_data(jax.make_array_from_callback(
                data.shape, self._replicated(), lambda i: data[i]))
        graphdef, state = nnx.split(model)
        with jax.set_mesh(self.mesh):
            return self._jit(graphdef, state, ids.astype(jnp.int32), mask.astype(jnp.int32),
                             key)

    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def _shard_cache(self, cache):
        """Keep the cache split like the batch (and kv heads like the k/v projections)."""
        if self.mesh is None:
            return cache
        kv = logical_to_spec(("layers", "batch", "seq", "kv_heads", "head_dim"), self.mesh,
                             self.rules, cache.k.shape)
        m = logical_to_spec(("batch", "seq"), self.mesh, self.rules, cache.mask.shape)
        put = lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, s))  # noqa: E731
        return cache._replace(k=put(cache.k, kv), v=put(cache.v, kv), mask=put(cache.mask, m))

    def _pick(self, logits: Array, key: Array) -> tuple[Array, Array]:
        """(token [b] int32, its log-prob [b] under softmax(logits / T)) from logits [b, v]."""
        z = logits / self.temperature
        tok = jnp.argmax(logits, axis=-1) if self.greedy else self._draw(z, key)
        tok = tok.astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tok[:, None], axis=-1)[:, 0]
        return tok, lp

    def _draw(self, z: Array, key: Array) -> Array:
        """A token [b] drawn from softmax(z) [b, v] restricted to the top-k, then top-p set.

        With top-k on, everything after `lax.top_k` works on the k candidates only: a full
        vocabulary sort (what top-p alone needs) costs more than a decode step on CPU.
        """
        idx = None
        if 0 < self.top_k < z.shape[-1]:
            z, idx = jax.lax.top_k(z, self.top_k)  # sorted descending
        if self.top_p < 1:
            zs = z if idx is not None else -jnp.sort(-z, axis=-1)
            ps = jax.nn.softmax(zs, axis=-1)
            # keep the smallest prefix whose mass reaches top_p: a token stays while the mass
            # strictly before it is < top_p, so the most likely token always stays
            keep = (jnp.cumsum(ps, axis=-1) - ps) < self.top_p
            last = jnp.sum(keep, axis=-1, keepdims=True) - 1
            z = jnp.where(z < jnp.take_along_axis(zs, last, axis=-1), -jnp.inf, z)
        choice = jax.random.categorical(key, z, axis=-1)
        return choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]

    def _generate(self, graphdef, state, ids: Array, mask: Array, key: Array) -> Samples:
        self.traces += 1  # runs only while tracing
        model = nnx.merge(graphdef, state)
        b, p = ids.shape
        n = self.max_new_tokens
        # n - 1 decode steps: the last sampled token is never fed back
        cache = _decoder(model).init_cache(b, p + n - 1, self.cache_dtype)
        h, cache = model.hidden_states(ids, mask, cache=self._shard_cache(cache))
        w = model.unembed()
        eos = jnp.asarray(self.eos or (-1,), jnp.int32)

        def emit(i, logits, done, bufs):
            tok, lp = self._pick(logits, jax.random.fold_in(key, i))
            live = ~done
            tok = jnp.where(live, tok, self.pad_id)
            out = (tok, live.astype(jnp.int32), jnp.where(live, lp, 0.0))
            bufs = tuple(jax.lax.dynamic_update_slice(buf, x[:, None], (0, i))
                         for buf, x in zip(bufs, out))
            return tok, live, done | (live & jnp.isin(tok, eos)), bufs

        def logits_of(h):
            return jnp.matmul(h[:, -1], w, preferred_element_type=jnp.float32)

        bufs = (jnp.full((b, n), self.pad_id, jnp.int32), jnp.zeros((b, n), jnp.int32),
                jnp.zeros((b, n), jnp.float32))
        tok, live, done, bufs = emit(0, logits_of(h), jnp.zeros((b,), bool), bufs)

        def cond(carry):
            i, _, _, done, _, _ = carry
            return (i < n) & ~jnp.all(done)

        def body(carry):
            i, tok, live, done, cache, bufs = carry
            # a finished row feeds its pad with mask 0: it no longer advances positions
            h, cache = model.hidden_states(tok[:, None], live[:, None].astype(jnp.int32),
                                           cache=cache)
            tok, live, done, bufs = emit(i, logits_of(h), done, bufs)
            return i + 1, tok, live, done, self._shard_cache(cache), bufs

        carry = (jnp.ones((), jnp.int32), tok, live, done, cache, bufs)
        tokens, m, logps = jax.lax.while_loop(cond, body, carry)[-1]
        return Samples(tokens, m, logps, jnp.sum(m, axis=1))


def _spans_processes(*xs) -> bool:
    """Whether any of `xs` is a jax Array with rows on other processes' devices."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in xs)


def _check_prompts(prompt_ids, prompt_mask) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of the prompts, after checking shapes and left padding."""
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be "
                         "[b, p]")
    m = mask != 0
    if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
        rows = np.flatnonzero(~m[:, -1] | (np.diff(m.astype(np.int8), axis=1) < 0).any(1))
        raise ValueError(f"prompts must be LEFT-padded with at least one real token (mask "
                         f"0..0 1..1); rows {rows.tolist()} are not (use collate_prompts)")
    return ids, mask


@functools.lru_cache(maxsize=64)
def _cached_sampler(**settings) -> Sampler:
    return Sampler(**settings)


def sample(model: nnx.Module, prompt_ids, prompt_mask, key: Array | None = None, *,
           max_new_tokens: int, **settings) -> Samples:
    """`Sampler(max_new_tokens=..., **settings)(model, prompt_ids, prompt_mask, key)`, with the
    Sampler (and so its compiled functions) reused across calls with equal settings."""
    if isinstance(settings.get("eos_id"), list):
        settings["eos_id"] = tuple(settings["eos_id"])  # hashable for the cache
    return _cached_sampler(max_new_tokens=max_new_tokens, **settings)(
        model, prompt_ids, prompt_mask, key)


def training_rows(prompt_ids: Array, prompt_mask: Array, samples: Samples, *,
                  pad_id: int = 0) -> dict[str, Array]:
    """Right-padded [b, p + n] rows `prompt + response` for scoring with `prefjax.lm.policy_out`.

    Returns input_ids, attention_mask and loss_mask (1 exactly on the response tokens, EOS
    included), laid out as prefjax/typing.py expects, plus `sample_token_logps` float32
    [b, p + n]: `samples.logps` in the response columns, 0 elsewhere (log-probs at the sampling
    temperature, see `Samples`). Jit-friendly (static shapes).
    """
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    b, p = prompt_mask.shape
    n = samples.tokens.shape[1]
    lp = jnp.sum(prompt_mask, axis=1)
    ids = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), samples.tokens], axis=1)
    resp = jnp.concatenate([jnp.zeros((b, p), jnp.int32), samples.mask], axis=1)
    logps = jnp.concatenate([jnp.zeros((b, p), jnp.float32), samples.logps], axis=1)
    # real tokens of a row are contiguous: columns p - lp .. p + lengths - 1; shift them to 0
    j = jnp.arange(p + n)[None, :]
    src = jnp.minimum(j + (p - lp)[:, None], p + n - 1)
    real = j < (lp + samples.lengths)[:, None]
    take = lambda x, fill: jnp.where(real, jnp.take_along_axis(x, src, axis=1), fill)  # noqa: E731
    return {"input_ids": take(ids, pad_id), "attention_mask": real.astype(jnp.int32),
            "loss_mask": take(resp, 0), "sample_token_logps": take(logps, 0.0)}

