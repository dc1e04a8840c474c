"""Scalar heads on a decoder: a reward model (one score per row) and a per-token value function.

Both wrap a decoder that follows the prefjax model interface (`hidden_states`, `unembed`) and
compute their head in float32. They hold the decoder they are given (no copy): to initialise a
reward model from an SFT policy and keep the policy, pass `nnx.clone(policy)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def last_real_index(attention_mask: Array) -> Array:
    """[b] int32: the last position where attention_mask is 1 (0 for an all-padding row).

    Works for right padding, left padding and both.
    """
    t = attention_mask.shape[1]
    idx = jnp.where(attention_mask != 0, jnp.arange(t, dtype=jnp.int32), -1)
    return jnp.maximum(jnp.max(idx, axis=1), 0)


class ScalarHead(nnx.Module):
    """x [..., d] -> [...] float32: x . kernel + bias, kernel [d, 1] named ('embed', None)."""

    def __init__(self, d: int, *, rngs: nnx.Rngs, std: float = 0.02, param_dtype=jnp.float32):
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (d, 1), param_dtype),
                                out_sharding=("embed", None), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((1,), param_dtype), out_sharding=(None,),
                              eager_sharding=False)

    def __call__(self, x: Array) -> Array:
        y = jnp.matmul(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        return (y + self.bias[...].astype(jnp.float32))[..., 0]


def _hidden_size(decoder: nnx.Module) -> int:
    return int(decoder.config.hidden_size)


def _std(decoder: nnx.Module) -> float:
    return float(getattr(decoder.config, "initializer_range", 0.02))


class RewardModel(nnx.Module):
    """Decoder + scalar head on the hidden state of each row's LAST real token.

    `__call__(input_ids [b, t], attention_mask [b, t]) -> [b] float32`. Padding after the last
    real token and pad ids never change the score (attention is causal and masked).
    """

    def __init__(self, decoder: nnx.Module, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.decoder = decoder
        self.head = ScalarHead(_hidden_size(decoder), rngs=rngs, std=_std(decoder),
                               param_dtype=param_dtype)

    @classmethod
    def from_hf(cls, path, *, rngs: nnx.Rngs, mesh=None, rules=None, param_dtype=jnp.float32,
                **load_kw) -> RewardModel:
        """A reward model whose decoder is the HF checkpoint at `path` (e.g. the SFT policy).

        The head is random, unless `path` holds `reward_head.safetensors` (written by
        `save_reward_model`): then it is the trained reward model. `mesh`, `rules` and
        `param_dtype` are `load_hf`'s: with a mesh the decoder is read shard by shard into its
        shardings and the head is placed by the same rules; a frozen scorer may be bf16.
        """
        from pathlib import Path

        from safetensors.numpy import load_file

        from prefjax.models.hf import load_hf

        decoder, _ = load_hf(path, tokenizer=False, mesh=mesh, rules=rules,
                             param_dtype=param_dtype, **load_kw)
        model = cls(decoder, rngs=rngs, param_dtype=param_dtype)
        head = Path(path) / HEAD_FILE
        if head.exists():
            w = load_file(head)
            for name in ("kernel", "bias"):
                var = getattr(model.head, name)
                if name not in w or w[name].shape != var[...].shape:
                    raise ValueError(f"{head}: tensor {name!r} missing or of shape "
                                     f"{getattr(w.get(name), 'shape', None)}, expected "
                                     f"{var[...].shape}")
                var[...] = jnp.asarray(w[name], var[...].dtype)
        if mesh is not None:
            _place_on(model.head, mesh, rules)
        return model

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None) -> Array:
        b, t = input_ids.shape
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
        h, _ = self.decoder.hidden_states(input_ids, mask, positions=positions)
        last = jnp.take_along_axis(h, last_real_index(mask)[:, None, None], axis=1)[:, 0]
        return self.head(last)


HEAD_FILE = "reward_head.safetensors"


def _place_on(module: nnx.Module, mesh, rules=None) -> None:
    """Move a (small) module's parameters onto `mesh` by their logical names, in place."""
    from prefjax import parallel

    state = nnx.state(module, nnx.Param)
    shardings = parallel.param_shardings(state, mesh, parallel.DEFAULT_RULES if rules is None
                                         else rules)
    nnx.update(module, jax.device_put(state, shardings))


def save_reward_model(model: RewardModel, path, *, tokenizer=None, **save_kw):
    """The decoder as an HF folder (`save_hf`) plus the head in `reward_head.safetensors`, so
    `RewardModel.from_hf(path)` restores the trained reward model. Call it on every process
    (like `save_hf`); process 0 writes."""
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save_file

    from prefjax.models.hf import host_array, save_hf

    path = save_hf(model.decoder, path, tokenizer=tokenizer, **save_kw)
    head = {k: np.asarray(host_array(getattr(model.head, k)[...]), np.float32)
            for k in ("kernel", "bias")}
    if jax.process_index() == 0:
        save_file(head, str(Path(path) / HEAD_FILE))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prefjax.save_reward_model")
    return path


class PolicyWithValue(nnx.Module):
    """Decoder + per-token value head: hidden states and values from ONE forward (for PPO).

    Alignment: `values[:, t] = V(state before token t is generated) = head(h[:, t-1])` for
    t >= 1, and `values[:, 0] = 0`. This matches token_logps, whose column t is
    log pi(ids[t] | ids[:t]) from the same h[:, t-1]: the value and the log-prob of an action
    sit in the same column, which is what GAE over response columns expects.
    """

    def __init__(self, decoder: nnx.Module, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.decoder = decoder
        self.value_head = ScalarHead(_hidden_size(decoder), rngs=rngs, std=_std(decoder),
                                     param_dtype=param_dtype)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, *,
                      positions: Array | None = None, cache=None):
        """The decoder's hidden states [b, t, d] and cache (so lm.token_logps works on it)."""
        return self.decoder.hidden_states(input_ids, attention_mask, positions=positions,
                                          cache=cache)

    def unembed(self) -> Array:
        return self.decoder.unembed()

    def values_from_hidden(self, h: Array) -> Array:
        """[b, t] float32 values aligned as in the class docstring, from h [b, t, d]."""
        v = self.value_head(h[:, :-1])
        return jnp.pad(v, ((0, 0), (1, 0)))

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None) -> tuple[Array, Array]:
        """(hidden states [b, t, d], values [b, t] float32)."""
        h, _ = self.hidden_states(input_ids, attention_mask, positions=positions)
        return h, self.values_from_hidden(h)
