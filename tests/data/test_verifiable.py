"""The verifiable task's exact-match checker, and naming a reward function in a config."""

import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.config import base_config
from prefjax.data import synthetic as syn
from prefjax.data import verifiable as ver
from prefjax.pipeline.rewards import is_named_callable, named_callable, reward_function


def samples(n, seed=0, width=8):
    """Left-padded prompt ids and sampler-format responses (pad after EOS) of the reference."""
    tok = syn.make_tokenizer()
    rng = np.random.default_rng(seed)
    prompts, ys = [], []
    for _ in range(n):
        x = syn.sample_prompt(rng)
        y = syn.sample_reference(x, rng)
        p = tok(" ".join(x))["input_ids"]
        prompts.append([syn.PAD_ID] * (width - len(p)) + p)
        ys.append(([syn.TOKEN_ID[w] for w in y] + [syn.EOS_ID] + [syn.PAD_ID] * width)[:width])
    return np.array(prompts), np.array(ys)


def test_exact_match_is_r_star_at_its_maximum():
    """Only the exact solution followed by EOS attains r* = 1.25 (synthetic.py), so the two
    independent implementations agree row by row; about 14% of reference samples solve."""
    p, y = samples(3000)
    em = ver.exact_match(p, y)
    r = np.asarray(syn.reward_of_samples(jnp.asarray(p), jnp.asarray(y)))
    np.testing.assert_array_equal(em == 1, np.isclose(r, 1.25))
    assert 0.1 < em.mean() < 0.2 and set(np.unique(em)) == {0.0, 1.0}


def test_exact_match_needs_the_eos_and_nothing_more():
    tok = syn.make_tokenizer()
    p = np.array([[0] + tok("rev a b c =")["input_ids"]])
    c, b, a = (syn.TOKEN_ID[w] for w in "cba")
    eos = syn.EOS_ID
    assert ver.exact_match(p, [[c, b, a, eos, 0, 0]])[0] == 1
    assert ver.exact_match(p, [[c, b, a, c, c, c]])[0] == 0  # never stops
    assert ver.exact_match(p, [[c, b, a, a, eos, 0]])[0] == 0  # one token too many
    assert ver.exact_match(p, [[c, b, eos, 0, 0, 0]])[0] == 0
    assert ver.solution(p[0]) == [c, b, a]
    with pytest.raises(ValueError, match="prompt_ids"):
        ver.exact_match(p[0], [[c]])


def test_a_config_names_a_reward_function():
    assert is_named_callable("prefjax.data.verifiable:exact_match")
    assert not is_named_callable("oracle") and not is_named_callable("workdirs/rm")
    assert named_callable("prefjax.data.verifiable:exact_match") is ver.exact_match
    with pytest.raises(ValueError, match="cannot import"):
        named_callable("prefjax.data.verifiable:nope")
    with pytest.raises(ValueError, match="cannot import"):
        named_callable("no_such_module_xyz:f")
    c = base_config()
    c.online.reward = "prefjax.data.verifiable:exact_match"
    fn = reward_function(c)
    p, y = samples(50, seed=1)
    np.testing.assert_array_equal(fn(p, y, None), ver.exact_match(p, y))
