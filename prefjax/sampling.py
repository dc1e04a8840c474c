"""Batched generation under jit: a KV-cache rollout engine with continuous batching and group
sampling; temperature, top-k, top-p, greedy, several EOS ids.

Prompts arrive LEFT-padded (`prompt_ids`, `prompt_mask` [b, p], e.g. from
`prefjax.data.tokenize.collate_prompts`). The whole generation is one jitted `while_loop` (no
host round-trip per token) over a fixed-size KV cache of `cache_rows` rows:

- a prefill computes a prompt's cache once; its `num_samples` samples copy it into their rows
  (group sampling for GRPO / RLOO / P3O);
- every row decodes one token per step; a row that hits EOS (or max_new_tokens) stops, and
  with fewer cache rows than samples it takes the next (prompt, sample) of the queue at once
  (continuous batching), so no row decodes padding while work is left;
- all rows share one cache write index: a new prompt is written to end just before it, and
  when the cache is full every row moves left (`cache.shift`), so the model's decode API and
  every attention implementation serve the engine unchanged.

The model is read only through the interface `prefjax.lm` uses (`hidden_states(ids, mask,
cache=)`, `unembed()`) plus `init_cache(b, max_len, dtype)`: Llama-family models, GPT-2 and
`PolicyWithValue` work, and the sampler runs the trainer's own modules (no weight copy).

Randomness comes only from the `key` passed in, per output row: row r (sample j of prompt i,
r = j * b + i, see `Samples`) uses `key_r = fold_in(key, r)` (or `key[r]` when one key per row
is given) and draws its token t with `fold_in(key_r, t)`. So a row's tokens do not depend on
the other rows, `cache_rows` or the refill order: prompt i gives the same tokens alone with
key `[fold_in(key, i)]` as in any batch, and `num_samples=k` gives the same rows as the
prompts tiled k times with the same key, from one prefill per prompt instead of k (equal up to
float rounding of different matmul shapes). Prompts are checked on the host, so call a Sampler
from Python, not inside another jit.
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

from prefjax.models import cache as kvc
from prefjax.models.cache import KVCache
from prefjax.parallel import (
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    logical_to_spec,
    param_shardings,
    rules_for,
)
from prefjax.token_choice import pick

Array = jax.Array


class Samples(NamedTuple):
    """What a `Sampler` returns; n = max_new_tokens, r = num_samples * b rows.

    Row j * b + i is sample j of prompt i: the samples of every prompt come as num_samples
    blocks of b rows, in prompt order (as `jnp.tile(prompts, (num_samples, 1))` lays them out).

    tokens:  int32 [r, n]  sampled ids; a row's EOS is kept (mask 1), every slot after it holds
                           `pad_id` (mask 0).
    mask:    int32 [r, n]  1 on generated tokens (a prefix of each row).
    logps:   float32 [r, n] log softmax(logits / temperature)[token] under the full
                           distribution: NOT renormalized over the top-k / top-p set the token was
                           drawn from (so at temperature 1 these are the policy's own log-probs).
                           Greedy uses the given temperature, or 1 when it is <= 0. 0 where mask
                           is 0.
    lengths: int32 [r]     number of generated tokens (sum of mask).
    """

    tokens: Array
    mask: Array
    logps: Array
    lengths: Array


def _decoder(model):
    """The module that owns `init_cache` and `config` (a value-head wrapper holds its decoder)."""
    return model if hasattr(model, "init_cache") else model.decoder


class _Rows(NamedTuple):
    """Per-row decode state of the engine (all [rows])."""

    unit: Array  # int32: the (prompt, sample) the row is generating, as q * num_samples + j
    t: Array  # int32: tokens generated so far
    tok: Array  # int32: the last token (fed at the next step)
    live: Array  # bool: still generating


class Sampler:
    """Generation with fixed settings; `sampler(model, prompt_ids, prompt_mask, key) -> Samples`.

    max_new_tokens: n, the static number of new-token slots (rows stop early at EOS; the loop
        stops when every row has).
    temperature > 0 (any value with greedy), top_k (None or 0: off), top_p in (0, 1] (1: off):
        applied in that order, as HF does; top-k keeps exactly k tokens (`lax.top_k`). The
        choice is `prefjax.token_choice.pick`; log-probs stay those of the full softmax at T.
    greedy: argmax instead of drawing (no key needed).
    eos_id: one id or several (any ends a row, e.g. Llama-3-Instruct's 128001 and 128009;
        `prefjax.train.build.eos_ids` reads them); None: never stop early.
    pad_id: what fills `tokens` after a row ends.
    num_samples: samples per prompt, all from one prefill of the prompt (see `Samples` for the
        row order).
    cache_rows: rows of the KV cache, i.e. sequences decoded at once. None (default): every
        sample at once (b * num_samples rows, no refill). Fewer: continuous batching; a finished
        row takes the next (prompt, sample) of the queue. Outputs do not depend on it.
    mesh: `prefjax.parallel.make_mesh` mesh; rows split over ("data", "fsdp") when divisible,
        the KV cache too, its kv heads as `rules` place 'kv_heads' (default: over "tensor").
        Parameters are used where they live: pass a model whose params are already placed
        (e.g. `merge_model(train_state)`) so they are not moved on every call.
    prompt_multiple: left-pad the prompt length up to a multiple of this, so prompts of nearby
        lengths share one compiled function (outputs do not change: padding is masked).
    prefill_buckets: with continuous batching, a refill prefills only the last p / 2^i columns
        of the left-padded prompt for the smallest i < prefill_buckets that holds its real
        tokens (one compiled prefill per bucket), so short prompts cost less than p.
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    gather_params: with a mesh whose "fsdp" axis splits the parameters (the trainer's FSDP
        layout), gather them over "fsdp" once per call, before the loops. Left split (False,
        the default), the compiler gathers every layer's weights again at every decode step:
        all the weights cross the interconnect per token, where gathered once they cross it
        once per rollout. Gathered, each chip holds the whole model (split over "tensor" only)
        for the call: Qwen2.5-0.5B's rollout on 4 v5e chips needs no more memory, Llama-3-8B's
        no longer fits them (benchmarks/README.md, "Parameters split over fsdp").

    `traces` counts how often the generation function was traced (= compiled).
    """

    def __init__(self, *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, greedy: bool = False,
                 eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                 num_samples: int = 1, cache_rows: int | None = None,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 prompt_multiple: int = 1, prefill_buckets: int = 1, cache_dtype=None,
                 gather_params: bool = False):
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
        if not isinstance(num_samples, int | np.integer) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if cache_rows is not None and (not isinstance(cache_rows, int | np.integer)
                                       or cache_rows < 1):
            raise ValueError(f"cache_rows must be None or an int >= 1, got {cache_rows!r}")
        if not isinstance(prefill_buckets, int | np.integer) or prefill_buckets < 1:
            raise ValueError(f"prefill_buckets must be an int >= 1, got {prefill_buckets!r}")
        self.max_new_tokens, self.greedy = int(max_new_tokens), bool(greedy)
        self.temperature = float(temperature) if temperature > 0 else 1.0
        self.top_k, self.top_p = int(top_k or 0), float(top_p)
        self.eos, self.pad_id, self.mesh, self.rules = eos, int(pad_id), mesh, rules
        self.num_samples = int(num_samples)
        self.cache_rows = None if cache_rows is None else int(cache_rows)
        self.prompt_multiple, self.cache_dtype = int(prompt_multiple), cache_dtype
        self.prefill_buckets = int(prefill_buckets)
        self.gather_params = bool(gather_params)
        self.traces = 0
        self._jit = jax.jit(self._generate, static_argnums=0)

    def __call__(self, model: nnx.Module, prompt_ids, prompt_mask, key: Array | None = None
                 ) -> Samples:
        """Samples for left-padded `prompt_ids` / `prompt_mask` [b, p] (see the class doc).

        key: one jax.random key, or one per output row ([num_samples * b]; row r then
        samples with key[r] exactly as it would alone with that key).
        """
        if key is None:
            if not self.greedy:
                raise ValueError("sampling needs a jax.random key (or greedy=True)")
            key = jax.random.key(0)
        if _spans_processes(prompt_ids, prompt_mask):
            return self._call_global(model, prompt_ids, prompt_mask, key)
        ids, mask = _check_prompts(prompt_ids, prompt_mask)
        key = _typed_key(key, self.num_samples * ids.shape[0])
        p = -(-ids.shape[1] // self.prompt_multiple) * self.prompt_multiple
        if p > ids.shape[1]:  # extra left padding changes nothing but the compile key
            pad = ((0, 0), (p - ids.shape[1], 0))
            ids = np.pad(ids, pad, constant_values=self.pad_id)
            mask = np.pad(mask, pad)
        self._check_length(model, p)
        ids, mask = ids.astype(np.int32), mask.astype(np.int32)
        graphdef, state = nnx.split(model)
        if self.mesh is None:
            return self._jit(graphdef, state, ids, mask, key)
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        sh = batch_sharding(self.mesh) if ids.shape[0] % rows == 0 else self._replicated()
        ids, mask = jax.device_put(ids, sh), jax.device_put(mask, sh)
        key = jax.device_put(key, self._replicated())
        with jax.set_mesh(self.mesh):
            return self._jit(graphdef, state, ids, mask, key)

    def _check_length(self, model, p: int) -> None:
        # the training rows built from the samples are p + n long and must fit the model too
        limit = getattr(_decoder(model).config, "max_position_embeddings", None)
        if limit is not None and p + self.max_new_tokens > limit:
            raise ValueError(
                f"prompt length {p} (after bucketing) + max_new_tokens {self.max_new_tokens} = "
                f"{p + self.max_new_tokens} exceeds the model's max_position_embeddings={limit}; "
                "shorten the prompts or lower max_new_tokens")

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
        self._check_length(model, p)
        if not _spans_processes(key):  # the same key on every process, made one global array
            key = _typed_key(key, self.num_samples * ids.shape[0])
            if key.ndim:
                raise ValueError("global prompts take one key (the same on every process), "
                                 "not one per row")
            data = np.asarray(jax.random.key_data(key))
            key = jax.random.wrap_key_data(jax.make_array_from_callback(
                data.shape, self._replicated(), lambda i: data[i]))
        graphdef, state = nnx.split(model)
        with jax.set_mesh(self.mesh):
            return self._jit(graphdef, state, ids.astype(jnp.int32), mask.astype(jnp.int32),
                             key)

    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def _shard(self, x: Array, names: tuple) -> Array:
        if self.mesh is None:
            return x
        spec = logical_to_spec(names, self.mesh, self.rules, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _gathered(self, model: nnx.Module) -> nnx.Module:
        """`model` with every parameter split over "fsdp" gathered over it (still split over
        "tensor" as `rules` place it), once per call, before the loops."""
        if self.mesh is None or not self.gather_params or self.mesh.shape["fsdp"] == 1:
            return model
        state = nnx.state(model)
        # the "tp" strategy's rules: parameters keep every axis of `rules` but "fsdp"
        target = param_shardings(state, self.mesh, rules_for("tp", self.rules))
        nnx.update(model, jax.tree.map(
            lambda x, sh: x.replace(jax.lax.with_sharding_constraint(x.get_value(),
                                                                     sh.get_value())),
            state, target, is_leaf=lambda x: isinstance(x, nnx.Variable)))
        return model

    def _shard_cache(self, cache: KVCache) -> KVCache:
        """Keep the cache split like the batch (and kv heads like the k/v projections)."""
        names = ("layers", "batch", "kv_heads", "seq", "head_dim")
        shard = lambda x: self._shard(x, names[-x.ndim:])  # noqa: E731  (stacked or per layer)
        return cache._replace(k=jax.tree.map(shard, cache.k), v=jax.tree.map(shard, cache.v),
                              mask=self._shard(cache.mask, ("batch", "seq")))

    def _generate(self, graphdef, state, ids: Array, mask: Array, key: Array) -> Samples:
        self.traces += 1  # runs only while tracing
        model = self._gathered(nnx.merge(graphdef, state))
        q, p = ids.shape
        k, n = self.num_samples, self.max_new_tokens
        units = q * k  # unit u = sample u % k of prompt u // k
        rows = min(self.cache_rows or units, units)
        keys = key if key.ndim else jax.vmap(jax.random.fold_in, (None, 0))(
            key, jnp.arange(units))  # one per output row
        # The output projection of a tied embedding is its transpose. XLA CPU's dots want it
        # as [d, v] rows and would transpose it at every use inside the loops, so on CPU it is
        # taken once (a copy in host memory). The TPU compiler reads [v, d] as it lies, and
        # hoisting there made a copy of the whole embedding that the loops carry (544 MB of
        # HBM at Qwen2.5-0.5B, benchmarks/rollout_memory.py): there it is read at each use.
        mesh = self.mesh
        on = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        w = model.unembed() if on == "cpu" else None

        def logits_of(h):  # [g, d] -> float32 [g, v]
            return jnp.matmul(h, model.unembed() if w is None else w,
                              preferred_element_type=jnp.float32)

        eos = jnp.asarray(self.eos or (-1,), jnp.int32)
        width = p + n - 1  # slots a row uses: its prompt and every token fed back
        slack = cache_slack(width, continuous=rows < units)

        def prefill(ids, mask):
            """(cache [g, p'] of the prompts, logits [g, v] of their next token)."""
            cache = _decoder(model).init_cache(ids.shape[0], ids.shape[1], self.cache_dtype)
            h, cache = model.hidden_states(ids, mask, cache=self._shard_cache(cache))
            return cache, logits_of(h[:, -1])

        def row_keys(unit, t):
            out_row = jnp.clip((unit % k) * q + unit // k, 0, units - 1)
            return jax.vmap(jax.random.fold_in)(keys[out_row], t)

        def emit(logits, r: _Rows, bufs):
            """Each live row draws its token t into the buffers; rows that end stop."""
            tok, lp = pick(logits, row_keys(r.unit, r.t), temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p, greedy=self.greedy)
            at = jnp.where(r.live, r.unit, units)  # out of range: dropped
            bufs = (bufs[0].at[at, r.t].set(tok, mode="drop"),
                    bufs[1].at[at, r.t].set(1, mode="drop"),
                    bufs[2].at[at, r.t].set(lp, mode="drop"))
            t = r.t + r.live
            ends = jnp.isin(tok, eos) | (t >= n)
            return _Rows(r.unit, t, jnp.where(r.live, tok, self.pad_id), r.live & ~ends), bufs

        bufs = (jnp.full((units, n), self.pad_id, jnp.int32), jnp.zeros((units, n), jnp.int32),
                jnp.zeros((units, n), jnp.float32))
        # the first rows: one batched prefill of the prompts they need, shared by their samples
        g = -(-rows // k)
        pre, logits = prefill(ids[:g], mask[:g])
        # the whole prefill ends before its cache is copied into the decode cache: interleaved
        # layer by layer, the TPU compiler kept every layer's prefill buffers allocated
        # (Qwen2.5-0.5B shape at 64 rows, benchmarks/rollout_memory.py: 3.17 -> 2.32 GB)
        pre, logits = jax.lax.optimization_barrier((pre, logits))
        first = jnp.arange(rows, dtype=jnp.int32)
        cache = self._shard_cache(kvc.from_prefix(pre, first // k, p + slack + n - 1))
        r = _Rows(first, jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32),
                  jnp.ones(rows, bool))
        r, bufs = emit(jnp.take(logits, first // k, axis=0), r, bufs)
        store = (kvc.rows(pre, g - 1, g), logits[g - 1:g])
        refill = self._refiller(ids, mask, prefill, emit, units) if rows < units else None
        state0 = (jnp.asarray(rows, jnp.int32), store)
        if refill is not None:
            cache, r, bufs, state0 = refill(cache, r, bufs, state0)

        def body(carry):
            cache, r, bufs, queue = carry
            if slack:  # the shared write index reached the end: drop slots no row needs
                cache = jax.lax.cond(cache.index >= cache.max_len,
                                     lambda c: kvc.shift(c, slack + 1), lambda c: c, cache)
            # a finished row feeds its pad with mask 0: it no longer advances positions
            h, cache = model.hidden_states(r.tok[:, None], r.live[:, None].astype(jnp.int32),
                                           cache=cache)
            r, bufs = emit(logits_of(h[:, -1]), r, bufs)
            cache = self._shard_cache(cache)
            if refill is not None:
                cache, r, bufs, queue = refill(cache, r, bufs, queue)
            return cache, r, bufs, queue

        carry = jax.lax.while_loop(lambda c: jnp.any(c[1].live), body,
                                   (cache, r, bufs, state0))
        # units are prompt-major (q * k + j); rows come sample-major (j * q + i)
        tokens, m, logps = (self._shard(x.reshape(q, k, n).swapaxes(0, 1).reshape(units, n),
                                        ("batch", None)) for x in carry[2])
        return Samples(tokens, m, logps, jnp.sum(m, axis=1))

    def _refiller(self, ids, mask, prefill, emit, units):
        """`refill(cache, rows, bufs, queue) -> same`: give every finished row the next unit.

        queue = (next unit, store): store holds the cache [1, p] and next-token logits of the
        prompt of the last unit handed out, so a prompt is prefilled once for all its samples.
        """
        k, p = self.num_samples, ids.shape[1]
        lens = [p]  # prefill widths, longest first: p, p/2, ... (rounded up)
        while len(lens) < self.prefill_buckets and lens[-1] > 1:
            lens.append(-(-lens[-1] // 2))

        def prefill_one(i):
            pid, pm = ids[i][None], mask[i][None]
            if len(lens) == 1:
                return prefill(pid, pm)
            real = jnp.sum(pm)
            branch = jnp.sum(jnp.asarray(lens[1:]) >= real)  # the shortest width that fits

            def run(width):
                def f():
                    c, lg = prefill(pid[:, p - width:], pm[:, p - width:])
                    return kvc.pad_left(c, p - width), lg
                return f

            return jax.lax.switch(branch, [run(x) for x in lens])

        def cond(c):
            _, r, _, (nxt, _) = c
            return jnp.any(~r.live) & (nxt < units)

        def body(c):
            cache, r, bufs, (nxt, store) = c
            row = jnp.argmax(~r.live)
            store = jax.lax.cond(nxt % k == 0, lambda s: prefill_one(nxt // k), lambda s: s,
                                 store)
            cache = kvc.place(cache, row, store[0])
            one = _Rows(nxt[None], jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                        jnp.ones(1, bool))
            one, bufs = emit(store[1], one, bufs)
            r = jax.tree.map(lambda a, b: a.at[row].set(b[0]), r, one)
            return self._shard_cache(cache), r, bufs, (nxt + 1, store)

        return lambda cache, r, bufs, queue: jax.lax.while_loop(cond, body,
                                                                (cache, r, bufs, queue))


def cache_slack(width: int, *, continuous: bool) -> int:
    """Slots the engine's KV cache holds beyond `width` (= prompt + max_new_tokens - 1, what one
    row uses): with continuous batching, room to run that many steps between shifts of the
    whole cache (`cache.shift`); none when every row is decoded at once."""
    return max(8, width // 4) if continuous else 0


def _typed_key(key, b: int) -> Array:
    """`key` as a typed jax key array: one key (shape ()) or one per output row ([b])."""
    if not isinstance(key, jax.Array) or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))  # a raw uint32 PRNGKey
    if key.ndim not in (0, 1) or (key.ndim == 1 and key.shape[0] != b):
        raise ValueError(f"key must be one jax.random key or one per output row ([{b}] = "
                         f"num_samples * prompts), got a key array of shape {key.shape}")
    return key


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

