"""PPO's policy + value model with SEPARATE trunks (the value model e.g. initialised from the RM).

InstructGPT (Ouyang et al. 2022, appendix C.3) and TRL's PPO initialise the value function from
the reward model: its own decoder and its scalar head, trained alongside the policy.
`PolicyAndValueModel` is a `PolicyWithValue` (same call contract, same value alignment), so
`prefjax.lm.policy_out`, the sampler and the exporter treat it like the shared-trunk model;
it only computes the values from the value trunk's hidden states instead of the policy's.
"""

from __future__ import annotations

import jax
from flax import nnx

from prefjax.models.heads import PolicyWithValue, RewardModel

Array = jax.Array


class PolicyAndValueModel(PolicyWithValue):
    """Policy decoder + value model (decoder `value_decoder` + scalar `value_head`).

    `__call__(input_ids [b, t], attention_mask) -> (policy hidden states [b, t, d], values
    [b, t])` with `values[:, t] = value_head(value_hidden[:, t-1])` and `values[:, 0] = 0`, the
    alignment of `PolicyWithValue`. Both trunks read the same token ids: the value model must
    share the policy's tokenizer (as the reward model that scores the samples already does).
    """

    def __init__(self, decoder: nnx.Module, value_decoder: nnx.Module, value_head: nnx.Module):
        self.decoder = decoder
        self.value_decoder = value_decoder
        self.value_head = value_head

    @classmethod
    def from_reward_model(cls, decoder: nnx.Module, reward_model: RewardModel
                          ) -> PolicyAndValueModel:
        """The value model is `reward_model`'s decoder and head (held, not copied)."""
        return cls(decoder, reward_model.decoder, reward_model.head)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None) -> tuple[Array, Array]:
        h, _ = self.hidden_states(input_ids, attention_mask, positions=positions)
        hv, _ = self.value_decoder.hidden_states(input_ids, attention_mask, positions=positions)
        return h, self.values_from_hidden(hv)
