"""The contracts every prefjax module shares: batch layout, policy outputs, loss signature.

Token alignment (used everywhere): for a row `input_ids[b, :]`, `token_logps[b, t]` is
`log pi(input_ids[b, t] | input_ids[b, :t])`, and `loss_mask[b, t]` is 1 exactly where
`input_ids[b, t]` is a scored (response) token. Position 0 is never scored.

Pairwise batches stack chosen rows first, then rejected rows: rows `[:n]` are chosen,
`[n:2n]` rejected, in one concatenated forward. Keys a batch may carry (all float32 unless noted):

  input_ids       int32 [b, t]   prompt + response (+ right padding for training batches)
  attention_mask  int32 [b, t]   1 on real tokens
  loss_mask       int32 [b, t]   1 on response tokens (aligned with input_ids)
  ref_logps             [b]      reference sequence log-probs (sum over loss_mask)
  ref_token_logps       [b, t]   reference per-token log-probs (PPO / diagnostics)
  old_logps             [b]      sampling-policy sequence log-probs (P3O)
  old_token_logps       [b, t]   sampling-policy per-token log-probs (PPO)
  old_values            [b, t]   value estimates at rollout time (PPO)
  advantages            [b, t]   GAE advantages, already whitened (PPO)
  returns               [b, t]   value targets (PPO)
  rewards               [b]      scalar rewards / scores of each row (P3O, online DPO)
  ref_sample_mask       [m]      MPO only: the last m rows are reference-policy samples;
                                 1 marks a real sample (m is static: it is this key's shape)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

Array = jax.Array
Batch = dict[str, Array]
Metrics = dict[str, Array]


class PolicyOut(NamedTuple):
    """What the train step hands to a loss: built by `prefjax.lm`, float32."""

    token_logps: Array  # [b, t] log pi(y_t | y_<t); 0 where loss_mask == 0
    logps: Array  # [b] masked sum over t
    lengths: Array  # [b] number of response tokens (for length-averaged losses)
    values: Array | None = None  # [b, t] value head (PPO only)
    scores: Array | None = None  # [b] scalar head (reward model only)


class LossFn(Protocol):
    """`loss(out, batch) -> (scalar loss, metrics)`; hyperparameters bound by `losses.get`.

    A loss and its metrics are written over the whole batch it receives (token means over all
    its scored tokens, pair means over all its pairs, batch statistics over all its rows). With
    gradient accumulation the train step still calls it once, on the full batch's PolicyOut
    reassembled from the micro-batch forwards, and back-propagates through each micro-batch
    (`prefjax.train.step._loss_and_grads`), so it needs no accumulation-specific code. For that,
    every PolicyOut field is row-leading ([b] or [b, ...]) and gradients reach the parameters
    only through `out`.
    """

    def __call__(self, out: PolicyOut, batch: Batch) -> tuple[Array, Metrics]: ...


Params = Any
