"""PPO's separate-trunk value model: initialised from a reward model, its value at column t is
that reward model's score of the prefix ids[:t]; the policy half is the untouched policy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from prefjax import lm
from prefjax.models.heads import RewardModel, save_reward_model
from prefjax.models.hf import load_hf
from prefjax.models.value import PolicyAndValueModel
from prefjax.pipeline.models import export_model
from tests.models.hf_fixtures import make_tiny_checkpoint
from tests.models.test_heads import decoder, rows


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_values_are_the_reward_models_prefix_scores(kind):
    policy = decoder(kind)
    rm = RewardModel(decoder("llama" if kind == "gpt2" else "gpt2"), rngs=nnx.Rngs(3))
    m = PolicyAndValueModel.from_reward_model(policy, rm)
    ids, mask = rows()
    h, values = m(ids, mask)
    np.testing.assert_allclose(h, policy.hidden_states(ids, mask)[0], rtol=1e-6, atol=1e-6)
    assert float(values[0, 0]) == 0.0
    for t in range(1, 5):  # row 0 is right-padded with 5 real tokens
        want = rm(ids[:1, :t], mask[:1, :t])[0]
        np.testing.assert_allclose(values[0, t], want, rtol=1e-5, atol=1e-5, err_msg=str(t))
    # through the step's forward: policy log-probs unchanged, values masked to the loss mask
    loss = np.zeros_like(mask)
    loss[0, 2:5] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}
    out = lm.policy_out(m, batch)
    np.testing.assert_allclose(out.values, np.asarray(values) * loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.token_logps, lm.policy_out(policy, batch).token_logps,
                               rtol=1e-6, atol=1e-7)
    assert export_model(m) is policy  # the export drops the value model


def test_value_model_trains_both_trunks_and_reads_the_reward_model_folder(tmp_path):
    """pipeline.models.value_model('reward') loads online.reward's decoder AND head."""
    from prefjax.config import base_config
    from prefjax.pipeline.models import value_model

    path = make_tiny_checkpoint("llama", tmp_path / "rm_base")
    dec, tok = load_hf(path)
    trained = RewardModel(dec, rngs=nnx.Rngs(5))
    folder = save_reward_model(trained, tmp_path / "rm", tokenizer=tok)
    c = base_config()
    c.online.reward = str(folder)
    c.online.value_model = "reward"
    policy, _ = load_hf(make_tiny_checkpoint("llama", tmp_path / "policy", seed=1))
    m = value_model(c, policy, mesh=None, rules=None)
    assert isinstance(m, PolicyAndValueModel) and m.decoder is policy
    ids = np.arange(1, 9, dtype=np.int32)[None]
    mask = np.ones_like(ids)
    np.testing.assert_allclose(m(ids, mask)[1][0, -1], trained(ids[:, :-1], mask[:, :-1])[0],
                               rtol=1e-5, atol=1e-5)
    def size(mod):
        return sum(x.size for x in jax.tree.leaves(nnx.state(mod, nnx.Param)))

    assert size(m) == size(policy) + size(trained)  # both trunks and the head are trainable
