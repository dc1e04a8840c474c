"""The rollout engine: continuous batching, group sampling and several EOS ids, each against
an independent run (a prompt sampled alone, the prompts tiled, a run without EOS)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from prefjax.parallel import batch_sharding, make_mesh, param_shardings
from prefjax.sampling import Sampler
from prefjax.train.build import eos_ids
from tests.test_sampling import (
    N,
    P,
    V,
    check_structure,
    greedy_reference,
    prompts,
    tiny_gpt2,
    tiny_llama,
)

LENS16 = (8, 5, 3, 1, 7, 2, 6, 4, 8, 1, 3, 5, 2, 7, 4, 6)
EOS = (3, 5, 7, 9, 11, 13)  # ~1 in 10 of the vocabulary: responses of mixed lengths
KW = dict(max_new_tokens=N, temperature=1.0, top_k=12, eos_id=EOS)
# shared so that runs of equal shapes compile once: every batch is left padded to P
FULL = Sampler(prompt_multiple=P, **KW)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, llama):
    return llama if request.param == "llama" else tiny_gpt2()


def arrays(s):
    return [np.asarray(x) for x in s]


def assert_same(a, b):
    """Equal tokens, mask, lengths; log-probs equal up to float rounding of other shapes."""
    a, b = arrays(a), arrays(b)
    for x, y in zip(a[:2] + a[3:], b[:2] + b[3:]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a[2], b[2], atol=1e-5)


def test_continuous_batching_gives_each_prompt_its_tokens_alone(model):
    ids, mask = prompts(LENS16, seed=11)
    key = jax.random.key(7)
    # 2 cache rows for 16 prompts: rows are refilled from the queue, several cache shifts
    cont = Sampler(cache_rows=2, prefill_buckets=3, **KW)(model, ids, mask, key)
    check_structure(cont, eos=EOS)
    lengths = np.asarray(cont.lengths)
    assert lengths.min() < N and lengths.max() == N  # early EOS really happened
    # decode steps >= (tokens not drawn at a prefill) / rows > 13 + 1: the shared write index
    # (8 prompt slots + 8 spare + 5 fed tokens = 21) wrapped at least once
    assert (lengths.sum() - len(ids)) / 2 > 14
    assert_same(cont, FULL(model, ids, mask, key))  # every prompt at once
    for i in range(len(ids)):
        alone = FULL(model, ids[i:i + 1], mask[i:i + 1], jax.random.fold_in(key, i)[None])
        assert_same(alone, [x[i:i + 1] for x in cont])


def test_group_sampling_equals_sampling_the_tiled_prompts(llama):
    model = llama
    ids, mask = prompts(LENS16[:5], seed=12)
    key = jax.random.key(8)
    tiled = FULL(model, np.tile(ids, (3, 1)), np.tile(mask, (3, 1)), key)
    for rows in (None, 4):  # one batch of 15 rows; continuous over 4 rows
        group = Sampler(num_samples=3, cache_rows=rows, **KW)(model, ids, mask, key)
        assert group.tokens.shape == (15, N)
        assert_same(group, tiled)
    # the samples of a prompt differ from each other (distinct keys), and greedy ones do not
    toks = np.asarray(tiled.tokens).reshape(3, 5, N)
    assert not (toks[0] == toks[1]).all()
    greedy = Sampler(max_new_tokens=N, greedy=True, num_samples=4, cache_rows=6)(model, ids,
                                                                                 mask)
    ref = greedy_reference(model, ids, mask, N)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.tile(ref, (4, 1)))


def test_group_sampling_prefills_each_prompt_once(llama):
    """4 prompts x 4 samples cost one 4-prompt prefill, where the 16 tiled prompts cost four:
    compiled flops (XLA counts a loop body once; the decode bodies of both are equal)."""
    ids, mask = prompts(LENS16[:4], seed=13)
    g, st = nnx.split(llama)

    def flops(f, *args):
        return jax.jit(f, static_argnums=0).lower(g, st, *args).compile().cost_analysis()["flops"]

    def prefill(g, st, ids, mask):
        m = nnx.merge(g, st)
        return m.hidden_states(ids, mask, cache=m.init_cache(4, P))

    key = jax.random.key(0)
    group = flops(Sampler(num_samples=4, **KW)._generate, ids, mask, key)
    tiled = flops(Sampler(**KW)._generate, np.tile(ids, (4, 1)), np.tile(mask, (4, 1)), key)
    np.testing.assert_allclose(tiled - group, 3 * flops(prefill, ids, mask), rtol=0.05)


def test_stops_at_any_of_several_eos_ids(llama):
    model = llama
    ids, mask = prompts(LENS16[:8], seed=14)
    key = jax.random.key(9)
    free = np.asarray(Sampler(max_new_tokens=N, top_k=12)(model, ids, mask, key).tokens)
    # one id that row 0 draws at step 2 and one row 1 draws at step 1, neither earlier there
    eos = (int(free[0, 2]), int(free[1, 1]))
    assert not np.isin(free[0, :2], eos).any() and free[1, 0] not in eos
    out = Sampler(max_new_tokens=N, top_k=12, eos_id=eos, cache_rows=3)(model, ids, mask, key)
    check_structure(out, eos=eos)
    tok = np.asarray(out.tokens)
    for b, row in enumerate(free):  # each row: the free run up to its first EOS of either
        hit = np.flatnonzero(np.isin(row, eos))
        k = hit[0] + 1 if len(hit) else N
        assert int(out.lengths[b]) == k
        np.testing.assert_array_equal(tok[b, :k], row[:k])
    assert int(out.lengths[0]) == 3 and int(out.lengths[1]) == 2


def test_generated_reference_samples_end_at_any_eos_id(llama):
    """MPO's generated reference samples (`extra_rows.generate_samples`) stop at the first of
    several EOS ids: each stored completion is the single-EOS run's row cut at that point."""
    import datasets

    from prefjax.pipeline.extra_rows import generate_samples

    rng = np.random.default_rng(16)
    ds = datasets.Dataset.from_dict({"prompt_ids": [rng.integers(14, V, n).tolist()
                                                    for n in LENS16[:8]]})
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=V - 1)
    kw = dict(num=8, batch_size=8, seed=5, max_new_tokens=N, tokenizer=tok, prompt_len=P)
    free = generate_samples(llama, ds, **kw)["completion_ids"]
    # the tokenizer's EOS first (as `build.eos_ids` lists them), then two ids that rows 0 and 1
    # draw before their end
    eos = (V - 1, free[0][2], free[1][1])
    got = generate_samples(llama, ds, eos_id=eos, **kw)["completion_ids"]
    cut = []
    for row, out in zip(free, got):
        hit = [i for i, t in enumerate(row) if t in eos]
        want = row[:hit[0] + 1] if hit else row
        assert out == want
        cut.append(len(want) < len(row))
    assert sum(cut) >= 2  # the several ids really stopped rows early


@pytest.mark.parametrize("gather_params", [False, True])
def test_continuous_sharded_8_devices_equals_single_device(llama, gather_params):
    model = llama
    ids, mask = prompts(LENS16[:8], seed=15)
    key = jax.random.key(3)
    mesh8 = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh8)))
    one = Sampler(num_samples=2, cache_rows=4, **KW)(model, ids, mask, key)
    out = Sampler(num_samples=2, cache_rows=4, mesh=mesh8, gather_params=gather_params,
                  **KW)(sharded, ids, mask, key)
    assert len(out.tokens.sharding.device_set) == 8
    assert_same(out, one)


def test_eos_ids_from_tokenizer_and_generation_config(tmp_path):
    tok = SimpleNamespace(eos_token_id=128009)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128009}))
    assert eos_ids(tok, tmp_path) == (128009,)
    # Llama-3-Instruct's generation_config.json lists both; it wins over config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001,
                                                                                  128009]}))
    assert eos_ids(tok, tmp_path) == (128009, 128001)
    assert eos_ids(tok, None) == eos_ids(tok, "tiny") == (128009,)
    with pytest.raises(ValueError, match="no EOS id"):
        eos_ids(SimpleNamespace(eos_token_id=None), None)


def test_bad_engine_arguments_fail_at_once():
    for kw in (dict(num_samples=0), dict(cache_rows=0), dict(prefill_buckets=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Sampler(max_new_tokens=4, **kw)
    ids, mask = prompts()
    with pytest.raises(ValueError, match="one per output row"):
        Sampler(max_new_tokens=4, num_samples=2)(tiny_llama(), ids, mask,
                                                 jax.random.split(jax.random.key(0), len(ids)))


assert V > max(EOS)


@pytest.mark.parametrize("v,d,rows", [(32768, 256, 3), (151936, 896, None)])
def test_tied_unembedding_is_not_copied_through_the_tpu_decode_loop(v, d, rows):
    """The TPU compiler reads a tied embedding [v, d] in place as the output projection; taken
    (transposed) once outside the loops, it became a copy of the embedding that the loops carry
    (544 MB at Qwen2.5-0.5B: 1.09 and 0.52 embeddings of temporaries in these two cases). The
    engine compiled for an abstract v5e chip (libtpu, no TPU; one layer, 4 prompts x 2 samples,
    with and without refills) keeps its temporaries under a quarter of the embedding."""
    from prefjax.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
    m = compile_engine_for_v5e(cfg, rows).memory_analysis()
    assert m.temp_size_in_bytes < 0.25 * v * d * 4, m.temp_size_in_bytes / (v * d * 4)


def compile_engine_for_v5e(cfg, rows: int | None, *, fsdp: int = 1, **settings):
    """The engine's whole generation for a Llama of `cfg` (abstract weights), 4 prompts of 8
    tokens x 2 samples, compiled for `fsdp` abstract v5e chips (libtpu, no TPU needed): the
    parameters split over them as a trainer places them, the prompts too."""
    from prefjax.models import attention
    from prefjax.models.llama import Llama
    from prefjax.plan import topology_devices  # sets ALLOW_MULTIPLE_LIBTPU_LOAD itself
    g, st = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    mesh = make_mesh({"data": 1, "fsdp": fsdp}, devices=topology_devices("v5e:2x2")[0][:fsdp])
    here = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda x, sh=here: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    placed = jax.tree.map(lambda v, sh: spec(v.get_value(), sh.get_value()), st,
                          param_shardings(st, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
    key = spec(jax.eval_shape(lambda: jax.random.key(0)))
    ids = spec(jax.ShapeDtypeStruct((4, 8), np.int32), batch_sharding(mesh))
    s = Sampler(max_new_tokens=4, num_samples=2, cache_rows=rows, mesh=mesh, **settings)
    with jax.set_mesh(mesh), attention.compiling_for("tpu"):
        return s._jit.lower(g, placed, ids, ids, key).compile()


@pytest.mark.parametrize("rows", [None, 4])
def test_gathered_parameters_leave_the_decode_loop_without_weight_gathers(rows):
    """Parameters split over "fsdp" (a trainer's FSDP layout, here over 4 abstract v5e chips):
    left split, the compiled decode loop gathers every layer's weights at every step; with
    gather_params they are gathered once before it, and the loop's collectives move only
    per-row values (tokens, flags), not weights."""
    from prefjax import compiled
    from prefjax.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    layer = 2 * (256 * 256 + 256 * 128 + 3 * 256 * 512)  # one layer's weights in bf16
    moved = {}
    for gather in (False, True):
        hlo = compile_engine_for_v5e(cfg, rows, fsdp=4, gather_params=gather).as_text()
        loop = compiled.loop_carrying(hlo, r"\w+\[\d+,2,\d+,64\]")  # the decode loop (KV cache)
        moved[gather] = compiled.collectives(hlo, loop)["all-gather"]["bytes"]
    assert moved[False] >= cfg.num_layers * layer, moved
    assert moved[True] < 0.01 * layer, moved


@pytest.mark.parametrize("scan", [False, True])
def test_engine_compiles_for_a_tpu_with_splash_attention(scan):
    """A model configured for splash attention (TPU: q_start static, lengths multiples of 128)
    samples: its prefill into the cache runs blockwise and its decode steps read the cache
    directly, with the cache index traced. Before, the first rollout of any online trainer
    with `model.attention="splash"` failed on a TPU. Compiled for an abstract v5e chip."""
    from prefjax.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, attention_impl="splash", scan_layers=scan)
    compile_engine_for_v5e(cfg, 3)
