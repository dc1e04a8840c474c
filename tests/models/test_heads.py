"""Reward model and value head: which hidden state they read, alignment, padding, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.models.gpt2 import GPT2, GPT2Config
from prefjax.models.heads import PolicyWithValue, RewardModel, last_real_index
from prefjax.models.hf import load_hf
from prefjax.models.llama import Llama, LlamaConfig
from tests.models.hf_fixtures import make_tiny_checkpoint

V = 120


def decoder(kind: str):
    if kind == "gpt2":
        return GPT2(GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                               max_position_embeddings=32, initializer_range=0.3),
                    rngs=nnx.Rngs(0))
    return Llama(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, initializer_range=0.3),
                 rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def rm(request):
    return RewardModel(decoder(request.param), rngs=nnx.Rngs(1))


def rows():
    """Row 0 right-padded (5 real of 8), row 1 left-padded (5 real), same real tokens."""
    r = np.random.default_rng(0)
    real = r.integers(1, V, 5)
    ids = np.zeros((2, 8), np.int32)
    mask = np.zeros((2, 8), np.int32)
    ids[0, :5], mask[0, :5] = real, 1
    ids[1, 3:], mask[1, 3:] = real, 1
    return ids, mask


def test_last_real_index():
    m = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_real_index(jnp.asarray(m)), [2, 4, 2, 0])


def test_reward_reads_the_last_real_token(rm):
    ids, mask = rows()
    s = np.asarray(rm(jnp.asarray(ids), jnp.asarray(mask)))
    assert s.shape == (2,) and s.dtype == np.float32
    # independent reference: head applied by hand (float64) to the hidden state at the last real
    h, _ = rm.decoder.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    k = np.asarray(rm.head.kernel[...], np.float64)[:, 0]
    b = float(rm.head.bias[...][0])
    ref = [np.asarray(h[0, 4], np.float64) @ k + b, np.asarray(h[1, 7], np.float64) @ k + b]
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s[0], s[1], atol=1e-5)  # left vs right padding: same score

    # pad ids after (or before) the real tokens, and extra pad columns, change nothing
    noisy = ids.copy()
    noisy[0, 5:], noisy[1, :3] = 7, 9
    wider_ids, wider_mask = np.pad(noisy, ((0, 0), (0, 4))), np.pad(mask, ((0, 0), (0, 4)))
    s2 = rm(jnp.asarray(wider_ids), jnp.asarray(wider_mask))
    np.testing.assert_allclose(s2, s, atol=1e-5)

    # the last real token itself matters
    changed = ids.copy()
    changed[0, 4] = (ids[0, 4] + 1) % V
    assert abs(float(rm(jnp.asarray(changed), jnp.asarray(mask))[0]) - s[0]) > 1e-4


def test_reward_gradients_closed_form_and_flow_to_decoder(rm):
    ids, mask = map(jnp.asarray, rows())
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)

    def f(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(ids, mask))

    g = jax.jit(jax.grad(f))(params)
    h, _ = rm.decoder.hidden_states(ids, mask)
    # d sum(score) / d bias = number of rows; / d kernel = sum of the last real hidden states
    np.testing.assert_allclose(g["head"]["bias"][...], [2.0], rtol=1e-6)
    np.testing.assert_allclose(g["head"]["kernel"][...][:, 0], np.asarray(h[0, 4] + h[1, 7]),
                               rtol=1e-5, atol=1e-6)
    dec = jax.tree.leaves(g["decoder"])
    assert dec and max(float(jnp.abs(x).max()) for x in dec) > 1e-4


def test_reward_model_from_hf_checkpoint_keeps_its_weights(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "sft", tokenizer=False)
    sft, _ = load_hf(path, tokenizer=False)
    rm = RewardModel.from_hf(path, rngs=nnx.Rngs(0))
    for a, b in zip(jax.tree.leaves(nnx.state(sft, nnx.Param)),
                    jax.tree.leaves(nnx.state(rm.decoder, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rm(jnp.ones((3, 4), jnp.int32)).shape == (3,)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_value_head_alignment_and_shapes(kind):
    pv = PolicyWithValue(decoder(kind), rngs=nnx.Rngs(2))
    ids, mask = map(jnp.asarray, rows())
    h, values = pv(ids, mask)
    assert h.shape == (2, 8, 32) and values.shape == (2, 8) and values.dtype == jnp.float32
    h_dec, _ = pv.decoder.hidden_states(ids, mask)
    np.testing.assert_allclose(h, h_dec, atol=1e-6)  # the same single forward
    # values[:, t] = head(h[:, t-1]); values[:, 0] = 0
    k = np.asarray(pv.value_head.kernel[...], np.float64)[:, 0]
    ref = np.asarray(h, np.float64)[:, :-1] @ k + float(pv.value_head.bias[...][0])
    np.testing.assert_array_equal(np.asarray(values)[:, 0], 0.0)
    np.testing.assert_allclose(values[:, 1:], ref, rtol=1e-5, atol=1e-6)
    # V(state before token t) must not see token t: changing it moves only columns > t
    t = 2
    changed = ids.at[0, t].set((ids[0, t] + 1) % V)
    _, v2 = pv(changed, mask)
    np.testing.assert_allclose(v2[0, : t + 1], values[0, : t + 1], atol=1e-6)
    assert float(jnp.abs(v2[0, t + 1:5] - values[0, t + 1:5]).max()) > 1e-5


def test_value_head_gradient_flows():
    pv = PolicyWithValue(decoder("gpt2"), rngs=nnx.Rngs(3))
    ids, mask = map(jnp.asarray, rows())
    g = nnx.grad(lambda m: jnp.sum(m(ids, mask)[1] * mask))(pv)
    h, _ = pv.decoder.hidden_states(ids, mask)
    m = np.asarray(mask, np.float32)[:, 1:, None]
    # closed form: d/d kernel of sum_t mask[t] * head(h[t-1])
    np.testing.assert_allclose(g.value_head.kernel[...][:, 0],
                               (np.asarray(h)[:, :-1] * m).sum((0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.value_head.bias[...], [m.sum()], rtol=1e-6)
    dec = jax.tree.leaves(nnx.state(g.decoder))
    assert max(float(jnp.abs(x).max()) for x in dec) > 1e-4
