"""Test fixtures: a tiny causal LM following the model contract, a pairwise batch, forward, loss.

The model (embedding, one attention + MLP block, lm_head) has the real logical axis names, call
signature and `hidden_states` / `unembed` split, but no KV cache. The forward and DPO-like loss
are written here, independently of `prefjax.lm` and `prefjax.losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.typing import PolicyOut

P = nnx.with_partitioning
NORMAL = nnx.initializers.normal(0.2)


def _dense(din, dout, names, rngs):
    return nnx.Linear(din, dout, use_bias=True, kernel_init=P(NORMAL, names),
                      bias_init=P(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


class TinyLM(nnx.Module):
    """Causal LM: vocab v, width d, heads h (head_dim d // h), mlp width f."""

    def __init__(self, vocab: int = 16, d: int = 8, heads: int = 2, f: int = 16, *,
                 rngs: nnx.Rngs):
        self.h = heads
        self.embed = nnx.Embed(vocab, d, embedding_init=P(NORMAL, ("vocab", "embed")), rngs=rngs)
        self.q = _dense(d, d, ("embed", "heads"), rngs)
        self.k = _dense(d, d, ("embed", "kv_heads"), rngs)
        self.v = _dense(d, d, ("embed", "kv_heads"), rngs)
        self.o = _dense(d, d, ("heads", "embed"), rngs)
        self.up = _dense(d, f, ("embed", "mlp"), rngs)
        self.down = _dense(f, d, ("mlp", "embed"), rngs)
        self.norm = nnx.RMSNorm(d, scale_init=P(nnx.initializers.ones_init(), ("norm",)),
                                rngs=rngs)
        self.lm_head = nnx.Param(NORMAL(rngs.params(), (d, vocab)), out_sharding=("embed", "vocab"))

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, cache=None):
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        x = self.embed(input_ids)
        split = lambda y: y.reshape(b, t, self.h, -1)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & mask[:, None, None, :]
        s = jnp.where(allowed, s, -1e9)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
        x = x + self.o(a)
        x = x + self.down(jax.nn.gelu(self.up(x)))
        return self.norm(x), None

    def unembed(self) -> jax.Array:
        return self.lm_head[...]

    def __call__(self, input_ids, attention_mask=None, *, positions=None, cache=None):
        h, _ = self.hidden_states(input_ids, attention_mask)
        return (h @ self.unembed()).astype(jnp.float32)


VOCAB = 16


def tiny_model(rngs):
    return TinyLM(VOCAB, d=8, heads=2, f=16, rngs=rngs)


def pair_batch(n_pairs: int, t: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """n_pairs chosen rows then n_pairs rejected rows, right padded, response from position 2."""
    r = np.random.default_rng(seed)
    b = 2 * n_pairs
    ids = r.integers(0, VOCAB, (b, t)).astype(np.int32)
    lengths = r.integers(3, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = mask * (np.arange(t)[None] >= 2)
    return {"input_ids": ids * mask, "attention_mask": mask,
            "loss_mask": loss_mask.astype(np.int32),
            "ref_logps": r.normal(-8.0, 1.0, b).astype(np.float32)}


def forward(model, batch) -> PolicyOut:
    """Sequence log-probs written independently of prefjax.lm (full log-softmax)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logp = jax.nn.log_softmax(model(ids, mask)[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    tok = jnp.pad(tok, ((0, 0), (1, 0))) * batch["loss_mask"]
    return PolicyOut(token_logps=tok, logps=tok.sum(-1),
                     lengths=batch["loss_mask"].sum(-1).astype(jnp.float32))


def dpo_loss(out: PolicyOut, batch, beta: float = 0.5):
    """-mean log sigmoid(beta * (chosen margin - rejected margin)) over pairs."""
    n = out.logps.shape[0] // 2
    r = out.logps - batch["ref_logps"]
    z = beta * (r[:n] - r[n:])
    return -jnp.mean(jax.nn.log_sigmoid(z)), {"rewards/margins": jnp.mean(z / beta)}
