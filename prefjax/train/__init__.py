"""Training: state, jitted step builder, checkpointing (re-exports only)."""

from prefjax.train.checkpoint import Checkpointer
from prefjax.train.state import (
    TrainState,
    abstract_train_state,
    count_params,
    create_train_state,
    merge_model,
    state_shardings,
    step_key,
)
from prefjax.train.step import (
    build_eval_step,
    build_train_step,
    gather_process_blocks,
    merge_microbatches,
    split_microbatches,
)

__all__ = [
    "Checkpointer",
    "TrainState",
    "abstract_train_state",
    "build_eval_step",
    "build_train_step",
    "count_params",
    "create_train_state",
    "gather_process_blocks",
    "merge_microbatches",
    "merge_model",
    "split_microbatches",
    "state_shardings",
    "step_key",
]
