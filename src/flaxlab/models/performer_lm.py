r"""Performer byte-level language model: a causal FAVOR+ transformer with O(1)-per-token decoding.

Choromanski et al., "Rethinking Attention with Performers", arXiv 2009.14794 (section 4: causal
FAVOR+ for autoregressive modelling). Tokens are bytes (vocabulary 256). The model is

.. math::
    h_0 = E[x_t] + P_t, \quad h = \mathrm{Encoder}_{causal}(h_0), \quad
    \mathrm{logits}_t = W h_t + b

with a learned token embedding ``E`` (``embed``), a learned position embedding ``P``
(``posemb`` ``[1, seq_len, hidden]``), flaxlab's pre-LN :class:`~flaxlab.nn.transformer.Encoder`
called with ``causal=True`` and a dense ``head``. Position ``t``'s logits predict byte ``t + 1``.

Sampling (:func:`generate`) never recomputes the prefix: each layer and head keeps the causal
FAVOR+ running sums (:class:`~flaxlab.nn.favor.FavorCausalState`), updated by
:func:`~flaxlab.nn.favor.favor_causal_step` in ``O(M D)`` per token. Those sums are
kept relative to the running max of key logits, the same strictly causal stabiliser as the
parallel path, so :func:`recurrent_logits` equals the forward pass position by position.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.models.common import resolve_dtype
from flaxlab.nn.attention import AttentionConfig
from flaxlab.nn.favor.causal import favor_causal_init_state, favor_causal_step
from flaxlab.nn.layers_scan import check_remat
from flaxlab.nn.transformer import Encoder
from flaxlab.train.task import Batch, TaskBase, TaskConfig


def _default_attention() -> AttentionConfig:
    return AttentionConfig(kind="favor", num_features=64)


@dataclasses.dataclass(frozen=True)
class PerformerLMConfig:
    """Configuration of a :class:`PerformerLM` (a byte-level causal transformer).

    Attributes:
      vocab_size: number of token values (256 for bytes).
      seq_len: maximum context length (the position embedding's size).
      hidden_size, num_layers, num_heads, mlp_dim: transformer shape.
      dropout_rate: dropout after attention and in the MLP (training only).
      attention: the attention kernel; FAVOR+ with 64 random features by default.
      dtype: computation dtype (``bfloat16``: mixed precision; parameters stay float32 and
        FAVOR+ computes its features in float32).
      remat: per-block rematerialisation, ``"none"``, ``"full"``, ``"dots"`` or
        ``"dots_no_batch"`` (:mod:`flaxlab.nn.layers_scan`).
      scan_layers: run the blocks with one ``jax.lax.scan`` (same parameters and results).
    """

    vocab_size: int = 256
    seq_len: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    dropout_rate: float = 0.0
    attention: AttentionConfig = dataclasses.field(default_factory=_default_attention)
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        for name in ("vocab_size", "seq_len", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        resolve_dtype(self.dtype)
        check_remat(self.remat)


PRESETS = {
    "tiny": dict(seq_len=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
    "small": dict(seq_len=128, hidden_size=128, num_layers=2, num_heads=4, mlp_dim=512),
    "base": dict(seq_len=512, hidden_size=256, num_layers=4, num_heads=8, mlp_dim=1024),
}


def performer_lm_preset(name: str, **overrides) -> PerformerLMConfig:
    """A named :class:`PerformerLMConfig` (``tiny``, ``small``, ``base``) with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown Performer LM preset {name!r}; accepted: {sorted(PRESETS)}")
    return PerformerLMConfig(**{**PRESETS[name], **overrides})


class PerformerLM(nnx.Module):
    """Byte-level causal transformer language model (FAVOR+ attention by default).

    Call: ``model(tokens, *, deterministic=True, rngs=None)`` with int ``tokens`` ``[B, L]``
    (``L <= seq_len``) returns logits ``[B, L, vocab_size]``; position ``t`` predicts token
    ``t + 1``.

    Example:
      >>> model = PerformerLM(performer_lm_preset("tiny"), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 256)
    """

    def __init__(self, config: PerformerLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed = nnx.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nnx.initializers.normal(stddev=1.0),
            rngs=rngs,
        )
        self.posemb = nnx.Param(
            nnx.initializers.normal(stddev=0.02)(rngs.params(), (1, c.seq_len, c.hidden_size))
        )
        self.encoder = Encoder(
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.mlp_dim,
            dropout_rate=c.dropout_rate,
            attention=c.attention,
            dtype=resolve_dtype(c.dtype),
            remat=c.remat,
            scan_layers=c.scan_layers,
            rngs=rngs,
        )
        self.head = nnx.Linear(c.hidden_size, c.vocab_size, dtype=resolve_dtype(c.dtype), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, rngs=None) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence length {length} exceeds seq_len={self.config.seq_len}")
        x = self.embed(tokens) + self.posemb[...][:, :length]
        x = x.astype(resolve_dtype(self.config.dtype))
        x = self.encoder(x, causal=True, deterministic=deterministic, rngs=rngs)
        return self.head(x).astype(jnp.float32)


def _kernel_settings(model: PerformerLM):
    if model.config.attention.kind != "favor":
        raise ValueError(
            "recurrent decoding needs attention.kind='favor' (O(1) state per token), got "
            f"{model.config.attention.kind!r}"
        )
    return model.config.attention.favor_kernel


def _init_states(model: PerformerLM, batch_size: int):
    c = model.config
    kernel = _kernel_settings(model)
    head_dim = c.hidden_size // c.num_heads
    num_features = c.attention.num_features
    if kernel == "relu" and c.attention.feature_type == "deterministic":
        num_features = head_dim
    return [
        favor_causal_init_state(batch_size, c.num_heads, num_features, head_dim, kernel=kernel)
        for _ in range(c.num_layers)
    ]


def _decode_step(model: PerformerLM, states, token: jax.Array, position: jax.Array):
    """Feeds ``token`` [B] at ``position`` through every layer; returns (states, logits [B, V])."""
    c = model.config
    kernel = _kernel_settings(model)
    batch = token.shape[0]
    head_dim = c.hidden_size // c.num_heads
    pos = jax.lax.dynamic_index_in_dim(model.posemb[...][0], position, axis=0, keepdims=False)
    x = model.embed(token) + pos
    new_states = []
    for block, state in zip(model.encoder.blocks, states):
        attn = block.attn
        h = block.norm1(x)
        q, k, v = (
            layer(h).reshape(batch, c.num_heads, head_dim)
            for layer in (attn.query, attn.key, attn.value)
        )
        projection = None if attn.kernel.projection is None else attn.kernel.projection[...]
        state, y = favor_causal_step(state, q, k, v, projection, kernel=kernel)
        new_states.append(state)
        x = x + attn.out(y.astype(x.dtype).reshape(batch, c.hidden_size))
        x = x + block.mlp(block.norm2(x), deterministic=True)
    return new_states, model.head(model.encoder.encoder_norm(x))


@nnx.jit
def recurrent_logits(model: PerformerLM, tokens: jax.Array) -> jax.Array:
    """Logits ``[B, L, V]`` computed token by token with the O(1) recurrent state.

    Equals ``model(tokens)`` (deterministic) up to float rounding; used to check decoding.
    """
    states = _init_states(model, tokens.shape[0])

    def body(states, inputs):
        token, position = inputs
        return _decode_step(model, states, token, position)

    positions = jnp.arange(tokens.shape[1])
    _, logits = jax.lax.scan(body, states, (tokens.T, positions))
    return jnp.moveaxis(logits, 0, 1)


@nnx.jit(static_argnames=("num_tokens", "temperature"))
def _sample(model, prompt, num_tokens: int, rng, temperature: float):
    states = _init_states(model, prompt.shape[0])

    def feed(states, inputs):
        token, position = inputs
        states, logits = _decode_step(model, states, token, position)
        return states, logits

    prompt_len = prompt.shape[1]
    states, logits = jax.lax.scan(feed, states, (prompt.T, jnp.arange(prompt_len)))
    last = logits[-1]

    def draw(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def sample(carry, inputs):
        states, logits = carry
        key, position = inputs
        token = draw(logits, key)
        states, logits = _decode_step(model, states, token, position)
        return (states, logits), token

    keys = jax.random.split(rng, num_tokens)
    positions = prompt_len + jnp.arange(num_tokens)
    # The last sampled token needs no further step; positions past the end are never used for it,
    # so clamp them to stay inside the position table.
    positions = jnp.minimum(positions, model.config.seq_len - 1)
    _, tokens = jax.lax.scan(sample, (states, last), (keys, positions))
    return tokens.T


def generate(
    model: PerformerLM,
    prompt_bytes: bytes,
    num_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
) -> bytes:
    """Samples ``num_tokens`` bytes after ``prompt_bytes`` with the O(1)-per-token FAVOR+ state.

    The prompt is fed one token at a time into the per-layer, per-head running sums; then each
    new byte is drawn from ``softmax(logits / temperature)`` (``temperature=0``: greedy) and fed
    back. Nothing is recomputed over the prefix.

    Args:
      model: a :class:`PerformerLM` with FAVOR+ attention.
      prompt_bytes: non-empty prompt; ``len(prompt) + num_tokens <= seq_len + 1``.
      num_tokens: number of bytes to generate (>= 1).
      rng: a JAX PRNG key (same key, same bytes).
      temperature: sampling temperature (>= 0).

    Returns:
      The ``num_tokens`` generated bytes (without the prompt).

    Example:
      >>> generate(model, b"def ", 32, jax.random.key(0))
    """
    if isinstance(prompt_bytes, str):
        prompt_bytes = prompt_bytes.encode("utf-8")
    if len(prompt_bytes) < 1:
        raise ValueError("prompt_bytes must hold at least one byte")
    if int(num_tokens) < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    limit = model.config.seq_len + 1
    if len(prompt_bytes) + num_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_bytes)} bytes) + num_tokens ({num_tokens}) exceeds the model's "
            f"context: at most seq_len + 1 = {limit} bytes in all"
        )
    _kernel_settings(model)
    prompt = jnp.asarray(np.frombuffer(prompt_bytes, np.uint8).astype(np.int32))[None]
    tokens = _sample(model, prompt, int(num_tokens), rng, float(temperature))
    return bytes(np.asarray(tokens[0]).astype(np.uint8).tolist())


# ----------------------------------------------------------------------------- the LM task
# Autoregressive byte-level language modelling (next-byte cross-entropy).
#
# Batches are ``{"tokens": int [B, L + 1]}`` (plus a bool ``mask`` ``[B]`` for evaluation): the
# model reads ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``. The loss is the mean
# cross-entropy in nats, ``-1/(B L) sum_{b,t} log p(x_{b,t+1} | x_{b,<=t})``; bits per byte are
# ``loss / ln 2``.


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


@dataclasses.dataclass(frozen=True)
class LMTaskConfig(TaskConfig):
    """Language-model task settings: validation loss (nats per byte), lower is better."""

    best_metric: str = "loss"
    best_mode: str = "min"


class LMTask(TaskBase):
    """Next-byte prediction for :class:`PerformerLM` (any model mapping ``tokens [B, L]`` to
    ``logits [B, L, V]``).

    * ``loss``: mean cross-entropy (nats); metrics ``loss``, ``bits_per_byte``, ``accuracy``.
    * ``evaluate``: summed ``loss`` (nats), ``bits_per_byte`` and ``accuracy`` over the target
      tokens of real windows, with their ``count`` (tokens), so the summary is per byte.
    * ``predict``: per-window mean ``loss`` (nats) and ``bits_per_byte``.
    """

    Config = LMTaskConfig

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

    def headline(self, metrics: dict[str, float]) -> str:
        return f"validation bits per byte: {metrics['bits_per_byte']:.4f}"


# The family of the model registry.
Config = PerformerLMConfig
Model = PerformerLM
Task = LMTask
