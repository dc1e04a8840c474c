"""A live reference model: a frozen copy of the policy that scores each batch inside the step.

The three reference modes of a trainer (config `reference.mode`):
  precomputed  `ref_logps` are dataset columns (`prefjax.data.add_reference_logps`), computed
               once before training; no reference model in memory while training.
  live         `WithReference(policy, reference)` is the model of the train state; only the
               policy's parameters are trainable (`POLICY_PARAMS`), the reference lives in
               `state.rest` and `live_reference_forward` adds `ref_logps` to each batch.
  none         reference-free losses (SimPO, ORPO, MPO, DPO with reference_free=True).
"""

from __future__ import annotations

from flax import nnx

from prefjax.lm import policy_out
from prefjax.typing import Batch, PolicyOut

# nnx filter selecting the trainable half of a `WithReference`.
POLICY_PARAMS = nnx.All(nnx.Param, nnx.PathContains("policy"))


class WithReference(nnx.Module):
    """Policy + frozen reference in one module, so one TrainState (and one mesh) holds both."""

    def __init__(self, policy: nnx.Module, reference: nnx.Module):
        self.policy = policy
        self.reference = reference


def live_reference_forward(chunk_size: int | None = None):
    """Forward for a `WithReference` model -> `(policy PolicyOut, {"ref_logps": [b]})`.

    The reference's log-probs go through `stop_gradient` in the step (`run_forward`), and its
    parameters are not in `state.params`, so no gradient or optimizer state exists for them.
    """

    def forward(model: WithReference, batch: Batch) -> tuple[PolicyOut, Batch]:
        out = policy_out(model.policy, batch, chunk_size=chunk_size)
        ref = policy_out(model.reference, batch, chunk_size=chunk_size)
        return out, {"ref_logps": ref.logps}

    return forward


def unwrap_policy(model: nnx.Module) -> nnx.Module:
    """The policy inside a `WithReference`, or the model itself."""
    return model.policy if isinstance(model, WithReference) else model
