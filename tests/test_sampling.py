"""Sampler vs full forwards without a cache: greedy, log-probs, EOS, top-k/top-p, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax import lm
from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.llama import Llama, LlamaConfig
from prefjax.parallel import make_mesh, param_shardings
from prefjax.sampling import Sampler, Samples, sample, training_rows
from prefjax.token_choice import first_argmax, top_p_cut

V, P, N = 64, 8, 6
LENS = (8, 5, 3, 1)  # real prompt tokens per row (left padded to P)
# shared by several tests, so that their compiled functions are reused
GREEDY = Sampler(max_new_tokens=N, greedy=True)
SAMPLE = Sampler(max_new_tokens=N, temperature=1.0, prompt_multiple=8)


def tiny_llama(seed=0):
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, initializer_range=0.3,
                      max_position_embeddings=64)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def tiny_gpt2(seed=0):
    cfg = GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                     max_position_embeddings=32, initializer_range=0.3)
    return GPT2(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def prompts(lens=LENS, p=P, seed=0):
    """Left-padded ids, mask [len(lens), p]; pads hold id 0."""
    r = np.random.default_rng(seed)
    lens = np.asarray(lens)
    mask = (np.arange(p)[None] >= p - lens[:, None]).astype(np.int32)
    return (r.integers(1, V, mask.shape) * mask).astype(np.int32), mask


def full_logits(model, ids, mask):
    """Logits [b, t, v] of one uncached forward (jitted once per shape)."""
    g, s = nnx.split(model)
    return np.asarray(_forward(g, s, jnp.asarray(ids), jnp.asarray(mask)))


_forward = jax.jit(lambda g, s, ids, mask: nnx.merge(g, s)(ids, mask), static_argnums=0)
_policy_out = jax.jit(lambda g, s, rows: lm.policy_out(nnx.merge(g, s), rows), static_argnums=0)


def greedy_reference(model, ids, mask, n):
    """n tokens by argmax of repeated full forwards over the growing (left-padded) rows.

    Rows are right-padded to a fixed p + n (causal: later padding changes nothing before it),
    so every step reuses one compiled forward.
    """
    b, p = ids.shape
    seq = np.concatenate([ids, np.zeros((b, n), np.int32)], 1)
    m = np.concatenate([mask, np.zeros((b, n), np.int32)], 1)
    for i in range(n):
        seq[:, p + i] = full_logits(model, seq, m)[:, p + i - 1].argmax(-1)
        m[:, p + i] = 1
    return seq[:, p:]


def sampled_logits(model, ids, mask, out: Samples):
    """Logits [b, n, v] that predicted each sampled token, from one full forward."""
    seq = np.concatenate([ids, np.asarray(out.tokens)], 1)
    m = np.concatenate([mask, np.asarray(out.mask)], 1)
    p = ids.shape[1]
    return full_logits(model, seq, m)[:, p - 1:-1]


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def check_structure(out: Samples, eos=(), pad=0):
    """mask is a prefix of ones, pad after it, EOS only as a row's last token."""
    tok, m = np.asarray(out.tokens), np.asarray(out.mask)
    assert (np.diff(m, axis=1) <= 0).all()
    assert (tok[m == 0] == pad).all()
    assert (np.asarray(out.logps)[m == 0] == 0).all()
    np.testing.assert_array_equal(np.asarray(out.lengths), m.sum(1))
    for row, k in zip(tok, m.sum(1)):
        assert not np.isin(row[:max(k - 1, 0)], eos).any()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_with_cache_equals_full_forwards(kind, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[kind]
    ids, mask = prompts()
    out = GREEDY(model, ids, mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_reference(model, ids, mask, N))
    assert (np.asarray(out.mask) == 1).all()
    # greedy logps are the plain model log-probs (temperature 1)
    lp = log_softmax(sampled_logits(model, ids, mask, out))
    ref = np.take_along_axis(lp, np.asarray(out.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logps), ref, atol=1e-4)


@pytest.fixture(scope="module")
def topk_run(llama):
    """Sampling at T=0.7 with top-k=5, 16 rows x N tokens, EOS on (id 3)."""
    ids, mask = prompts(LENS * 4, seed=1)
    out = Sampler(max_new_tokens=N, temperature=0.7, top_k=5, eos_id=3)(
        llama, ids, mask, jax.random.key(0))
    return ids, mask, out


def test_logps_are_full_distribution_log_probs_at_temperature(llama, topk_run):
    ids, mask, out = topk_run
    check_structure(out, eos=(3,))
    z = sampled_logits(llama, ids, mask, out)
    ref = np.take_along_axis(log_softmax(z / 0.7), np.asarray(out.tokens)[..., None], -1)[..., 0]
    m = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logps), ref * m, atol=1e-4)


def test_top_k_never_leaves_the_k_most_likely(llama, topk_run):
    ids, mask, out = topk_run
    z = sampled_logits(llama, ids, mask, out)
    tok, m = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    chosen = np.take_along_axis(z, tok[..., None], -1)
    rank = (z > chosen).sum(-1)  # how many logits beat the sampled one
    assert rank[m].max() < 5
    assert rank[m].max() > 0  # it really samples


def test_logps_at_temperature_one_equal_policy_out_of_training_rows(llama):
    ids, mask = prompts(seed=2)
    out = SAMPLE(llama, ids, mask, jax.random.key(1))
    rows = training_rows(ids, mask, out)
    pol = _policy_out(*nnx.split(llama), rows)
    np.testing.assert_allclose(np.asarray(pol.token_logps), np.asarray(
        rows["sample_token_logps"]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(pol.logps), np.asarray(out.logps).sum(1), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(pol.lengths), np.asarray(out.lengths))
    # layout: right padded prompt + response, loss_mask exactly on the response
    for b in range(len(ids)):
        lp, ln = int(mask[b].sum()), int(out.lengths[b])
        want = np.zeros(P + N, np.int32)
        want[:lp + ln] = np.concatenate([ids[b, P - lp:], np.asarray(out.tokens)[b, :ln]])
        np.testing.assert_array_equal(np.asarray(rows["input_ids"])[b], want)
        np.testing.assert_array_equal(np.asarray(rows["attention_mask"])[b],
                                      np.arange(P + N) < lp + ln)
        np.testing.assert_array_equal(np.asarray(rows["loss_mask"])[b],
                                      (np.arange(P + N) >= lp) & (np.arange(P + N) < lp + ln))


def test_eos_stops_rows_independently(llama):
    ids, mask = prompts()
    free = greedy_reference(llama, ids, mask, N)
    # an EOS id that row 0 emits before its last step but some other row never emits
    eos = next(t for t in free[0, :N - 1] if any(t not in row for row in free[1:]))
    out = Sampler(max_new_tokens=N, greedy=True, eos_id=int(eos), pad_id=V + 1)(
        llama, ids, mask)
    check_structure(out, eos=(eos,), pad=V + 1)
    for b, row in enumerate(free):
        hit = np.flatnonzero(row == eos)
        k = hit[0] + 1 if len(hit) else N
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :k], row[:k])
        assert int(out.lengths[b]) == k
    assert int(out.lengths[0]) < N and int(out.lengths.max()) == N
    # every row ends at once (several EOS ids): one token each, the rest is padding
    firsts = tuple(int(t) for t in free[:, 0])
    out = Sampler(max_new_tokens=N, greedy=True, eos_id=firsts)(llama, ids, mask)
    np.testing.assert_array_equal(np.asarray(out.lengths), 1)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], free[:, 0])
    check_structure(out, eos=firsts)


@pytest.mark.parametrize("kw", [dict(top_k=1, temperature=2.0), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(llama, kw):
    ids, mask = prompts()
    out = Sampler(max_new_tokens=N, **kw)(llama, ids, mask, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_reference(llama, ids, mask, N))


def filtered_probs(z, top_k=0, top_p=1.0):
    """softmax(z) restricted to the top-k, then the top-p set, renormalized (float64 numpy)."""
    z = z.astype(np.float64)
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("t,top_k,top_p", [(0.8, 0, 1.0), (2.0, 10, 0.85), (1.5, 0, 0.7)])
def test_one_step_distribution_matches_softmax(llama, t, top_k, top_p):
    ids, mask = prompts([5], seed=4)
    n = 4096
    out = Sampler(max_new_tokens=1, temperature=t, top_k=top_k, top_p=top_p)(
        llama, np.repeat(ids, n, 0), np.repeat(mask, n, 0), jax.random.key(5))
    p = filtered_probs(full_logits(llama, ids, mask)[0, -1] / t, top_k, top_p)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=V)
    assert counts[p == 0].sum() == 0
    exp = n * p
    big = exp >= 5  # pool rare tokens into one bin so the chi-square approximation holds
    obs_b = np.append(counts[big], counts[~big].sum())
    exp_b = np.append(exp[big], exp[~big].sum())
    obs_b, exp_b = obs_b[exp_b > 0], exp_b[exp_b > 0]
    chi2, df = ((obs_b - exp_b) ** 2 / exp_b).sum(), len(exp_b) - 1
    assert df >= 3
    assert chi2 < df + 6 * np.sqrt(2 * df), (chi2, df)


def test_left_padding_invariance(llama):
    ids, mask = prompts()
    batch = GREEDY(llama, ids, mask)
    alone = ids[1:2, P - LENS[1]:], mask[1:2, P - LENS[1]:]  # row 1 without its padding
    out = sample(llama, *alone, max_new_tokens=N, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens)[0], np.asarray(batch.tokens)[1])


def test_compiles_once_per_bucket(llama):
    ids5, m5 = prompts((5, 2, 4, 1), p=5, seed=6)
    ids7, m7 = prompts((7, 7, 3, 6), p=7, seed=7)
    a = SAMPLE(llama, ids5, m5, jax.random.key(0))
    b = SAMPLE(llama, ids7, m7, jax.random.key(1))
    # prompt lengths 5 and 7 (and 8 in another test) share the bucket of 8: one trace in all
    assert SAMPLE.traces == 1
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.parametrize("gather_params", [False, True])
def test_sharded_8_devices_equals_single_device(llama, gather_params):
    ids, mask = prompts()
    mesh8 = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    graphdef, state = nnx.split(llama)
    placed = jax.device_put(state, param_shardings(state, mesh8))
    sharded = nnx.merge(graphdef, placed)
    kernel = sharded.layers[0].mlp.up.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    outs = [GREEDY(llama, ids, mask),  # one device
            Sampler(max_new_tokens=N, greedy=True, mesh=mesh8,
                    gather_params=gather_params)(sharded, ids, mask)]
    assert len(outs[1].tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logps), np.asarray(outs[1].logps), atol=1e-5)


def test_bad_arguments_fail_at_once(llama, gpt2):
    with pytest.raises(ValueError, match="temperature"):
        Sampler(max_new_tokens=4, temperature=0.0)
    Sampler(max_new_tokens=4, temperature=0.0, greedy=True)  # greedy needs no temperature
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            Sampler(max_new_tokens=4, top_p=top_p)
    with pytest.raises(ValueError, match="top_k"):
        Sampler(max_new_tokens=4, top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampler(max_new_tokens=0)
    ids, mask = prompts()
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        Sampler(max_new_tokens=25, greedy=True)(gpt2, ids, mask)  # 8 + 25 > 32
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        Sampler(max_new_tokens=40, greedy=True, prompt_multiple=32)(llama, ids, mask)
    with pytest.raises(ValueError, match="LEFT-padded"):
        Sampler(max_new_tokens=4, greedy=True)(llama, ids[:, ::-1], mask[:, ::-1])
    with pytest.raises(ValueError, match="key"):
        Sampler(max_new_tokens=4)(llama, ids, mask)


def test_greedy_pick_is_argmax_with_ties():
    """The sampler's vectorised argmax returns NumPy's first index of the maximum, ties
    included (small integer logits tie often)."""
    x = np.random.default_rng(0).integers(-3, 4, (64, 300)).astype(np.float32)
    x[0] = 1.0  # a row that is all ties
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(x)), np.argmax(x, axis=-1))


def kept_by_sorting(z: np.ndarray, top_p: float) -> np.ndarray:
    """bool [b, v]: top-p's set by its definition in float64: sort, keep a token while the mass
    strictly before it is < top_p, then every token equal to the last one kept."""
    out = []
    for row in z.astype(np.float64):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(-row, kind="stable")
        last = row[order][np.sum(np.cumsum(p[order]) - p[order] < top_p) - 1]
        out.append(row >= last)
    return np.array(out)


def test_top_p_cut_without_sorting_keeps_the_sorted_set():
    """`top_p_cut` (bisection over the float order, no sort) against the sorted rule: small
    vocabularies of rounded logits (many ties, -0.0 beside 0.0, -inf) and 4096-token rows."""
    r = np.random.default_rng(0)
    cut = jax.jit(top_p_cut, static_argnums=1)
    for _ in range(40):
        v, top_p = int(r.integers(2, 12)), float(r.uniform(0.05, 0.99))
        z = np.round(r.standard_normal((16, v)), 1).astype(np.float32)
        z[0, 0], z[1, :2], z[2, -1] = -0.0, (0.0, -0.0), -np.inf
        np.testing.assert_array_equal(np.asarray(cut(z, top_p)), kept_by_sorting(z, top_p))
    z = (3 * r.standard_normal((8, 4096))).astype(np.float32)
    for top_p in (0.3, 0.9, 0.999):
        np.testing.assert_array_equal(np.asarray(cut(z, top_p)), kept_by_sorting(z, top_p))
