"""Scanned layers and remat policies: same values as the per-layer loop, less to trace and save.

The reference is the loop model (`scan_layers=False`, no remat), which test_decoders.py checks
against HF PyTorch; the scanned model gets the loop model's parameters stacked per leaf.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.models import gpt2 as G
from prefjax.models import llama as L
from prefjax.sampling import sample
from tests.models.hf_fixtures import padded_batch

VOCAB = 96
# GQA + q/k/v biases + tied embedding; multi-query + sliding window (decode runs past it);
# GPT-2 tied; GPT-2 with per-layer 1 / (i + 1) score scaling and an untied head
CONFIGS = {
    "qwen2_gqa_tied": L.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True, model_type="qwen2",
        initializer_range=0.1),
    "mistral_window": L.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        num_kv_heads=1, sliding_window=4, model_type="mistral", initializer_range=0.1),
    "gpt2": G.GPT2Config(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4,
                         max_position_embeddings=32, initializer_range=0.1),
    "gpt2_scaled_untied": G.GPT2Config(
        vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=32,
        scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False, initializer_range=0.1),
}
CLASSES = {L.LlamaConfig: L.Llama, G.GPT2Config: G.GPT2}


def build(cfg, params=None, *, seed=0, remat=False, **fields):
    """A model of `cfg` (fields replaced) holding `params` (a pure dict), or numpy draws.

    Built abstractly and filled from numpy: no per-op XLA compiles at init, and biases and
    norm scales are not their trivial 0 / 1 (so a mis-stacked or unused one shows).
    """
    cfg = dataclasses.replace(cfg, **fields)
    cls = CLASSES[type(cfg)]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0),
                                                            remat=remat)))
    if params is None:
        r = np.random.default_rng(seed)
        params = jax.tree.map(lambda x: r.normal(0.0, 0.2, x.shape).astype(x.dtype),
                              state.to_pure_dict())
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def stack_layers(pure: dict, n: int) -> dict:
    """A loop model's pure params with `layers[i]` stacked into one leading [n] axis per leaf."""
    pure = dict(pure)
    layers = pure.pop("layers")
    pure["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *(layers[i] for i in range(n)))
    return pure


def scanned_copy(model, **fields):
    """A scan_layers=True model holding `model`'s parameters (each layer leaf stacked)."""
    pure = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    return build(model.config, stack_layers(pure, model.config.num_layers), scan_layers=True,
                 **fields)


def batch():
    ids, mask = padded_batch(vocab=VOCAB)  # full, right-padded and two left-padded rows
    return jnp.asarray(ids), jnp.asarray(mask)


def loss(model, ids, mask):
    logits = model(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -(tok * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits


def loss_and_layer_grads(model):
    """(loss, logits, grads with the layer leaves stacked [num_layers, ...] as a scan has them)."""
    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, *batch())
    pure = jax.tree.map(np.asarray, grads.to_pure_dict())
    if not model.config.scan_layers:
        pure = stack_layers(pure, model.config.num_layers)
    return float(value), np.asarray(logits), pure


def assert_same(got, ref, *, atol=1e-5):
    (l1, z1, g1), (l2, z2, g2) = got, ref
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    real = np.asarray(batch()[1]).astype(bool)
    assert np.abs(z1 - z2)[real].max() <= atol
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2),
                            strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference():
    """name -> (loop model, its (loss, logits, stacked grads)), built on first use."""
    made = {}

    def get(name):
        if name not in made:
            model = build(CONFIGS[name])
            made[name] = model, loss_and_layer_grads(model)
        return made[name]

    return get


def test_scanned_parameters_are_one_block_with_a_leading_layer_axis():
    loop = build(CONFIGS["qwen2_gqa_tied"])
    scan = scanned_copy(loop)
    flat = lambda m: dict(nnx.state(m, nnx.Param).flat_state())  # noqa: E731
    loop_p, scan_p = flat(loop), flat(scan)
    block = {p[2:]: v for p, v in loop_p.items() if p[:2] == ("layers", 0)}
    stacked = {p[1:]: v for p, v in scan_p.items() if p[0] == "layers"}
    assert block.keys() == stacked.keys() and ("attn", "q", "bias") in block
    for sub, v in block.items():
        s = stacked[sub]
        assert s.get_value().shape == (3, *v.get_value().shape)
        assert s.get_metadata()["out_sharding"] == ("layers", *v.get_metadata()["out_sharding"])
    rest = lambda d: {p: v.get_value().shape for p, v in d.items() if p[0] != "layers"}  # noqa: E731
    assert rest(loop_p) == rest(scan_p)  # embedding, final norm: unchanged
    # a random init draws every layer on its own, not one block repeated
    cfg = dataclasses.replace(CONFIGS["qwen2_gqa_tied"], scan_layers=True)
    q = np.asarray(L.Llama(cfg, rngs=nnx.Rngs(0)).layers.attn.q.kernel[...])
    assert np.abs(q[0] - q[1]).max() > 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scan_gives_the_loop_logits_and_gradients(name, reference):
    loop, ref = reference(name)
    assert_same(loss_and_layer_grads(scanned_copy(loop)), ref)
    assert max(np.abs(g).max() for g in jax.tree.leaves(ref[2])) > 1e-2  # gradients not ~0


# every policy once, scanned and in the loop (remat=True in the loop: test_decoders.py)
@pytest.mark.parametrize("name,scan,policies", [
    ("qwen2_gqa_tied", True, ["full", "dots_saveable", "save_qkv_proj"]),
    ("gpt2_scaled_untied", True, ["nothing_saveable", "dots_with_no_batch_dims_saveable"]),
    ("gpt2_scaled_untied", False, ["save_qkv_proj"])])
def test_remat_policies_give_the_values_without_remat(name, scan, policies, reference):
    loop, ref = reference(name)
    pure = jax.tree.map(np.asarray, nnx.state(loop, nnx.Param).to_pure_dict())
    for policy in policies:
        model = (scanned_copy(loop, remat_policy=policy) if scan else
                 build(loop.config, pure, remat_policy=policy))
        assert_same(loss_and_layer_grads(model), ref)


def residual_size(model) -> int:
    """Elements the backward pass keeps from the forward (parameters included)."""
    ids, mask = batch()
    graphdef, state = nnx.split(model)
    f = lambda s: loss(nnx.merge(graphdef, s), ids, mask)[0]  # noqa: E731
    vjp = jax.eval_shape(lambda s: jax.vjp(f, s)[1], state)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vjp))


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_change_what_the_backward_keeps(scan):
    cfg = CONFIGS["qwen2_gqa_tied"]
    size = {p: residual_size(build(cfg, scan_layers=scan, remat_policy=p))
            for p in L.REMAT_POLICIES}
    assert size["none"] > size["dots_saveable"] > size["dots_with_no_batch_dims_saveable"]
    assert size["dots_with_no_batch_dims_saveable"] > size["save_qkv_proj"] > size["full"]
    assert size["full"] == size["nothing_saveable"]
    # the older constructor switch is "full" remat of every block
    assert residual_size(build(cfg, scan_layers=scan, remat=True)) == size["full"]


def count_equations(jaxpr) -> int:
    """Equations of a jaxpr, those of its sub-jaxprs (scan / checkpoint / custom_vjp) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    n += count_equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    n += count_equations(sub)
    return n


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "gpt2_scaled_untied"])
def test_traced_program_does_not_grow_with_depth(name):
    ids, mask = batch()

    def size(layers, scan):
        model = build(CONFIGS[name], num_layers=layers, scan_layers=scan,
                      remat_policy="nothing_saveable")
        graphdef, state = nnx.split(model)
        grad = jax.grad(lambda s: loss(nnx.merge(graphdef, s), ids, mask)[0])
        return count_equations(jax.make_jaxpr(grad)(state).jaxpr)

    assert size(2, True) == size(8, True)
    assert size(8, False) > 3 * size(2, False) / 2  # the loop unrolls (the count is not blind)


def prompt_and_steps(seed=1):
    r = np.random.default_rng(seed)
    p, lengths = 6, np.array([6, 4, 2])
    pmask = (np.arange(p)[None] >= p - lengths[:, None]).astype(np.int32)  # left padded
    return (r.integers(4, VOCAB, (3, p)) * pmask).astype(np.int32), pmask


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "mistral_window", "gpt2_scaled_untied"])
def test_scanned_cached_decode_equals_full_forward(name, reference):
    loop, _ = reference(name)
    model = scanned_copy(loop, remat_policy="nothing_saveable")  # remat is off with a cache
    prompt, pmask = prompt_and_steps()
    p, n = prompt.shape[1], 6  # 12 tokens > mistral's window of 4
    cache = model.init_cache(3, p + n + 2)
    # one stacked, head-major buffer [layers, b, kv heads, slots, head_dim] (scanned layers)
    assert cache.k.shape[:2] == (model.config.num_layers, 3)
    assert cache.k.shape[3] == p + n + 2
    call = nnx.jit(lambda m, ids, mask, c: m(ids, mask, cache=c))
    logits, cache = call(model, jnp.asarray(prompt), jnp.asarray(pmask), cache)
    toks, steps = [], []
    for _ in range(n):
        toks.append(jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32))
        logits, cache = call(model, toks[-1], jnp.ones((3, 1), jnp.int32), cache)
        steps.append(logits[:, 0])
    seq = np.concatenate([prompt, *map(np.asarray, toks)], axis=1)
    smask = np.concatenate([pmask, np.ones((3, n), np.int32)], axis=1)
    full = np.asarray(nnx.jit(lambda m, ids, mask: m(ids, mask))(model, seq, smask))
    assert np.abs(np.asarray(jnp.stack(steps, axis=1)) - full[:, p:]).max() <= 1e-5
    assert int(cache.index) == p + n
    # the loop model's cache holds the same keys and values, layer by layer, at the real
    # slots (above layer 0 a padding slot holds the average over whatever the cache held)
    loop_cache = call(loop, seq, smask, loop.init_cache(3, p + n + 2))[1]
    real = np.pad(smask, ((0, 0), (0, 2))).astype(bool)
    for a, b in ((cache.k, loop_cache.k), (cache.v, loop_cache.v)):
        a, b = (np.asarray(x).transpose(0, 1, 3, 2, 4) for x in (a, jnp.stack(b)))  # slot-major
        np.testing.assert_allclose(a[:, real], b[:, real], atol=1e-5)


@pytest.mark.parametrize("name", ["mistral_window"])
def test_sampler_draws_the_same_tokens_from_the_scanned_model(name, reference):
    loop, _ = reference(name)  # the sampler decodes inside a while_loop
    prompt, pmask = prompt_and_steps(seed=2)
    key = jax.random.key(0)
    a = sample(loop, prompt, pmask, key, max_new_tokens=5, greedy=False)
    b = sample(scanned_copy(loop), prompt, pmask, key, max_new_tokens=5, greedy=False)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_allclose(np.asarray(b.logps), np.asarray(a.logps), atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "mistral_window"])
def test_continuous_batching_draws_the_same_tokens_from_the_scanned_model(name, reference):
    """Refills and whole-cache shifts (`cache.shift`, layer by layer on a stacked cache) give
    the scanned model the loop model's tokens: 6 (prompt, sample) units through 2 cache rows
    of 6 + 8 + 11 slots, so the shared write index reaches the end and shifts several times."""
    loop, _ = reference(name)
    prompt, pmask = prompt_and_steps(seed=3)
    key = jax.random.key(1)
    settings = dict(max_new_tokens=12, num_samples=2, cache_rows=2, greedy=False)
    a = sample(loop, prompt, pmask, key, **settings)
    b = sample(scanned_copy(loop), prompt, pmask, key, **settings)
    assert int(np.asarray(a.lengths).sum()) > 2 * (6 + 8 + 11)  # more steps than slots
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_allclose(np.asarray(b.logps), np.asarray(a.logps), atol=1e-5)


def test_shift_moves_a_stacked_cache_like_its_layers():
    from prefjax.models import cache as kvc
    r = np.random.default_rng(0)
    k, v = (jnp.asarray(r.normal(size=(3, 2, 1, 7, 4)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(r.integers(0, 2, (2, 7)), jnp.int32)
    stacked = kvc.KVCache(k, v, mask, jnp.asarray(7, jnp.int32))
    per_layer = stacked._replace(k=tuple(k), v=tuple(v))
    got, want = jax.jit(kvc.shift, static_argnums=1)(stacked, 3), kvc.shift(per_layer, 3)
    for a, b, before in ((got.k, want.k, k), (got.v, want.v, v)):
        a = np.asarray(a)
        np.testing.assert_array_equal(a, np.stack(b))
        np.testing.assert_array_equal(a[..., :4, :], np.asarray(before)[..., 3:, :])
        assert not a[..., 4:, :].any()  # free slots at the end
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    assert int(got.index) == int(want.index) == 4


@pytest.mark.parametrize("cls", [L.LlamaConfig, G.GPT2Config])
@pytest.mark.parametrize("field,value", [("remat_policy", "sometimes"),
                                         ("attention_impl", "magic"), ("scan_layers", "yes")])
def test_invalid_layer_options_fail_naming_the_field(cls, field, value):
    cfg = CONFIGS["gpt2" if cls is G.GPT2Config else "qwen2_gqa_tied"]
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field} .*{value}"):
        dataclasses.replace(cfg, **{field: value})


def test_scan_rejects_mixed_sliding_windows():
    cfg = dataclasses.replace(CONFIGS["qwen2_gqa_tied"], sliding_window=4, layer_types=(
        "full_attention", "sliding_attention", "sliding_attention"))
    with pytest.raises(ValueError, match="scan_layers=True .*same attention window"):
        dataclasses.replace(cfg, scan_layers=True)


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "gpt2"])
def test_layer_options_are_not_hf_fields(name):
    cfg = CONFIGS[name]
    other = dataclasses.replace(cfg, scan_layers=True, remat_policy="dots_saveable",
                                attention_impl="blockwise")
    assert hash(other) != hash(cfg)  # static model structure: hashable, and distinguished
    assert other.to_hf() == cfg.to_hf()
    back = type(cfg).from_hf(other.to_hf())
    assert (back.scan_layers, back.remat_policy, back.attention_impl) == (False, "none", "xla")


def test_dpo_smoke_config_runs_with_scanned_layers_and_a_remat_policy(tmp_path):
    from prefjax.main import run
    from tests.train.test_offline import ROOT, load_config, training_records

    c = load_config(ROOT / "configs" / "dpo_synthetic.py", "smoke")
    c.model.scan_layers = True  # as --config.model.scan_layers=True on the command line
    c.model.remat_policy = "nothing_saveable"
    c.model.num_layers = 2
    run(c, str(tmp_path))
    records = training_records(tmp_path)
    assert records[-1]["step"] == c.train.num_steps
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["num_hidden_layers"] == 2 and "scan_layers" not in exported


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_config_fields_reach_the_tiny_decoder(arch):
    from prefjax.config import base_config
    from prefjax.data import synthetic
    from prefjax.train.build import decoder_fn

    c = base_config()
    c.model.arch, c.model.scan_layers, c.model.remat_policy = arch, True, "dots_saveable"
    c.model.attention = "blockwise"
    make = decoder_fn(c, synthetic.make_tokenizer())
    model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    cfg = model.config
    assert (cfg.scan_layers, cfg.remat_policy, cfg.attention_impl) == (
        True, "dots_saveable", "blockwise")
    assert model.layers.mlp is not None  # one stacked block, not a list
    for field, bad in (("remat_policy", "some"), ("attention", "fast")):
        c.model[field] = bad
        with pytest.raises(ValueError, match=f"model.{field} must be one of"):
            decoder_fn(c, synthetic.make_tokenizer())
        c.model[field] = base_config().model[field]
