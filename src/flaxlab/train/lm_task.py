r"""Autoregressive byte-level language modelling (next-byte cross-entropy).

Batches are ``{"tokens": int [B, L + 1]}`` (plus a bool ``mask`` ``[B]`` for evaluation): the
model reads ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``. The loss is the mean
cross-entropy in nats, ``-1/(B L) sum_{b,t} log p(x_{b,t+1} | x_{b,<=t})``; bits per byte are
``loss / ln 2``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlab.models.registry import model_class

Batch = dict[str, jax.Array]


def _split(batch: Batch) -> tuple[jax.Array, jax.Array]:
    tokens = batch["tokens"]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"batch['tokens'] must be int [batch, length + 1 >= 2], got {tokens.shape}"
        )
    return tokens[:, :-1], tokens[:, 1:]


def next_token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in nats ``[B, L]`` (computed in float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


class LMTask:
    """Next-byte prediction for :class:`~flaxlab.models.performer_lm.PerformerLM` (any model
    mapping ``tokens [B, L]`` to ``logits [B, L, V]``).

    * ``loss``: mean cross-entropy (nats); metrics ``loss``, ``bits_per_byte``, ``accuracy``.
    * ``evaluate``: summed ``loss`` (nats), ``bits_per_byte`` and ``accuracy`` over the target
      tokens of real windows, with their ``count`` (tokens), so the summary is per byte.
    * ``predict``: per-window mean ``loss`` (nats) and ``bits_per_byte``.
    """

    def __init__(self, config):
        self.config = config
        self.model_cls = model_class(config.family)

    def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return self.model_cls(self.config.model, rngs=rngs)

    def loss(self, model, batch: Batch, rngs: nnx.Rngs):
        inputs, targets = _split(batch)
        logits = model(inputs, deterministic=False, rngs=rngs)
        ce = next_token_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == targets).mean()
        return ce, {"loss": ce, "bits_per_byte": ce / math.log(2.0), "accuracy": accuracy}

    def evaluate(self, model, batch: Batch) -> dict[str, jax.Array]:
        inputs, targets = _split(batch)
        logits = model(inputs, deterministic=True)
        weight = jnp.broadcast_to(batch["mask"].astype(jnp.float32)[:, None], targets.shape)
        ce = (next_token_cross_entropy(logits, targets) * weight).sum()
        return {
            "loss": ce,
            "bits_per_byte": ce / math.log(2.0),
            "accuracy": ((logits.argmax(-1) == targets) * weight).sum(),
            "count": weight.sum(),
        }

    def predict(self, model, batch: Batch) -> dict[str, jax.Array]:
        inputs, targets = _split(batch)
        ce = next_token_cross_entropy(model(inputs, deterministic=True), targets).mean(axis=1)
        return {"loss": ce, "bits_per_byte": ce / math.log(2.0)}
