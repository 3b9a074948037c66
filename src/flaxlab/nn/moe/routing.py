"""Sparse mixture-of-experts routing: top-k (V-MoE) and experts-choice, with auxiliary losses.

Pure functions of router logits of shape ``(groups, tokens, experts)``, written ``(G, S, E)``.
Every group is routed independently; ``C`` is the per-group capacity of each expert's buffer and
``K`` the number of experts chosen per token.

Semantics follow the V-MoE reference (Riquelme et al. 2021, https://arxiv.org/abs/2106.05974,
google-research/vmoe ``moe.py`` and ``nn/routing.py``):

* gates ``softmax(logits + noise_std / E * noise)`` both route and weight the combine;
* capacity ``ceil(S * K * capacity_factor / E)`` rounded up to a multiple of 4;
* buffer positions by a cumulative count over all first choices in token order, then all second
  choices, and so on; batch-prioritised routing (BPR) first sorts the tokens by descending top-1
  gate (stable);
* assignments past capacity are dropped and the surviving weights are *not* renormalised;
* importance loss on the noise-free softmax, load loss (Gaussian CDF) only when noisy, GShard loss
  scaled by ``E**2``, all per group.

Differences from the reference (fixes): ``batch_priority`` defaults to ``False`` (the reference
raises a TypeError when it is omitted); routing maths runs in float32 whatever the logits' dtype;
the compact index form (expert and buffer position per token and choice) is returned alongside,
so dispatchers never need the ``(G, S, E, C)`` one-hot tensors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    multiple_of: int | None = 4,
) -> int:
    """Per-expert buffer size: ``ceil(num_tokens * capacity_factor / num_experts)``, rounded up.

    ``num_tokens`` is the number of assignments to spread (``S * K`` for top-k routing, ``S`` for
    experts-choice routing). The result is rounded up to a multiple of ``multiple_of`` (no rounding
    for ``None`` or ``0``).

    Example:
      >>> compute_capacity(num_tokens=16 * 2, num_experts=8, capacity_factor=1.0)
      4
      >>> compute_capacity(num_tokens=10, num_experts=8, capacity_factor=1.0)
      4
    """
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be a number > 0.")
    if multiple_of is not None and multiple_of < 0:
        raise ValueError(f"capacity_multiple_of={multiple_of!r} must be None or an integer >= 0.")
    capacity = math.ceil(num_tokens * capacity_factor / num_experts)
    if multiple_of:
        capacity += (-capacity) % multiple_of
    return max(int(capacity), 1)


def _resolve_capacity(num_assignments, num_experts, capacity_factor, capacity, multiple_of):
    if (capacity is None) == (capacity_factor is None):
        raise ValueError(
            "Give exactly one of capacity and capacity_factor; got "
            f"capacity={capacity!r}, capacity_factor={capacity_factor!r}."
        )
    if capacity is not None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be an integer >= 1.")
        return int(capacity)
    return compute_capacity(num_assignments, num_experts, capacity_factor, multiple_of)


def _check_logits(logits):
    if logits.ndim != 3:
        raise ValueError(
            f"logits must have shape (groups, tokens, experts); got shape {logits.shape}."
        )


def _noisy_logits(logits, noise_std, noise, rng):
    """Returns ``logits + noise_std / E * noise`` (float32) and the noise scale used."""
    num_experts = logits.shape[-1]
    scale = noise_std / num_experts
    if noise is None:
        if rng is None:
            raise ValueError(
                f"noise_std={noise_std!r} > 0 needs either a `noise` tensor or an `rng` key."
            )
        noise = jax.random.normal(rng, logits.shape, jnp.float32)
    elif noise.shape != logits.shape:
        raise ValueError(f"noise has shape {noise.shape}; it must match logits {logits.shape}.")
    return logits + scale * noise.astype(jnp.float32), scale


def _coefficient_of_variation_squared(values):
    """``(std / mean)**2`` over the last axis (population std, as the reference)."""
    return (jnp.std(values, axis=-1) / jnp.mean(values, axis=-1)) ** 2


def importance_loss(gates: jax.Array) -> jax.Array:
    """Importance auxiliary loss per group (V-MoE, Appendix A.2).

    ``imp_e = sum_s gates[s, e]``;  ``loss = (std_e(imp) / mean_e(imp))**2``.

    Args:
      gates: ``(G, S, E)`` softmax gates (the noise-free ones, in V-MoE).

    Returns:
      ``(G,)`` losses.
    """
    return _coefficient_of_variation_squared(jnp.sum(gates, axis=-2))


def load_loss(
    logits: jax.Array, noisy_logits: jax.Array, noise_scale: float, num_selected_experts: int
) -> jax.Array:
    """Load auxiliary loss per group (V-MoE, Appendix A.2; Shazeer et al. 2017).

    With ``t_s`` the ``K``-th largest noisy logit of token ``s``,
    ``p[s, e] = 1 - Phi((t_s - logits[s, e]) / noise_scale)`` is the probability that expert ``e``
    would still be among the token's top-k if its noise were redrawn; the loss is
    ``(std_e(l) / mean_e(l))**2`` with ``l_e = mean_s p[s, e]``.

    Args:
      logits: ``(G, S, E)`` clean logits.
      noisy_logits: ``(G, S, E)`` logits plus noise.
      noise_scale: the noise standard deviation (``noise_std / E``), > 0.
      num_selected_experts: ``K``.

    Returns:
      ``(G,)`` losses.
    """
    threshold = jax.lax.top_k(noisy_logits, num_selected_experts)[0][..., -1:]
    p = 1.0 - jax.scipy.stats.norm.cdf((threshold - logits) / noise_scale)
    return _coefficient_of_variation_squared(jnp.mean(p, axis=-2))


def gshard_loss(gates: jax.Array) -> jax.Array:
    """GShard auxiliary loss per group (Lepikhin et al. 2020, Algorithm 1), scaled by ``E**2``.

    ``loss = E**2 * mean_e(mean_s(gates[s, e]) * mean_s(onehot(argmax_e gates[s])[e]))``; only the
    mean gates carry gradient. It equals 1 for perfectly balanced routing.

    Args:
      gates: ``(G, S, E)`` gates used for routing (noisy when noisy).

    Returns:
      ``(G,)`` losses.
    """
    num_experts = gates.shape[-1]
    top1_fraction = jnp.mean(jax.nn.one_hot(jnp.argmax(gates, -1), num_experts), axis=-2)
    mean_gates = jnp.mean(gates, axis=-2)
    return jnp.mean(top1_fraction * mean_gates, axis=-1) * num_experts**2


@struct.dataclass
class TopKRouting:
    """Result of :func:`top_k_routing` (a pytree; ``capacity`` and ``num_experts`` are static).

    Attributes:
      gates: ``(G, S, E)`` routing softmax (noisy when noise was used).
      expert_index: ``(G, S, K)`` int32, the chosen experts by decreasing gate.
      position: ``(G, S, K)`` int32, the buffer slot in that expert (may be ``>= capacity``).
      valid: ``(G, S, K)`` bool, ``position < capacity`` (the assignment is processed).
      weight: ``(G, S, K)`` the gate of each choice (not masked by ``valid``; the capacity-bound
        dispatchers multiply by ``valid``, the dropless one does not).
      importance_loss, load_loss, gshard_loss: ``(G,)`` per-group auxiliary losses;
        ``load_loss`` is ``None`` without noise.
      capacity: ``C``.
      num_experts: ``E``.
    """

    gates: jax.Array
    expert_index: jax.Array
    position: jax.Array
    valid: jax.Array
    weight: jax.Array
    importance_loss: jax.Array
    load_loss: jax.Array | None
    gshard_loss: jax.Array
    capacity: int = struct.field(pytree_node=False)
    num_experts: int = struct.field(pytree_node=False)

    @property
    def dispatch(self) -> jax.Array:
        """``(G, S, E, C)`` bool: token ``s`` occupies slot ``c`` of expert ``e``."""
        expert = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.bool_)
        slot = jax.nn.one_hot(
            jnp.where(self.valid, self.position, -1), self.capacity, dtype=jnp.bool_
        )
        return jnp.any(expert[..., :, None] & slot[..., None, :], axis=2)

    @property
    def combine(self) -> jax.Array:
        """``(G, S, E, C)`` float: the gate where :attr:`dispatch` is true, else 0."""
        return self.dispatch * self.gates[..., None]


@struct.dataclass
class ExpertsChoiceRouting:
    """Result of :func:`experts_choice_routing` (a pytree; ``capacity`` etc. are static).

    Attributes:
      gates: ``(G, S, E)`` routing softmax.
      token_index: ``(G, E, C)`` int32, the token in each slot (by decreasing gate).
      weight: ``(G, E, C)`` the gate of that token for that expert (the combine weight).
      capacity: ``C``.
      num_experts: ``E``.
    """

    gates: jax.Array
    token_index: jax.Array
    weight: jax.Array
    capacity: int = struct.field(pytree_node=False)
    num_experts: int = struct.field(pytree_node=False)

    @property
    def dispatch(self) -> jax.Array:
        """``(G, S, E, C)`` bool: token ``s`` occupies slot ``c`` of expert ``e``."""
        num_tokens = self.gates.shape[1]
        return jax.nn.one_hot(self.token_index, num_tokens, axis=1, dtype=jnp.bool_)

    @property
    def combine(self) -> jax.Array:
        """``(G, S, E, C)`` float: the gate where :attr:`dispatch` is true, else 0."""
        return self.dispatch * self.gates[..., None]


def top_k_routing(
    logits: jax.Array,
    num_selected_experts: int,
    *,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    capacity_multiple_of: int | None = 4,
    batch_priority: bool = False,
    noise_std: float = 0.0,
    noise: jax.Array | None = None,
    rng: jax.Array | None = None,
) -> TopKRouting:
    """Top-k ("experts per token") routing with fixed expert capacity, as in V-MoE.

    ``g = softmax(logits + noise_std / E * noise)``; each token picks its ``K`` largest gates.
    Choices are queued per expert: all first choices in token order (or, with
    ``batch_priority``, in order of decreasing top-1 gate, ties in token order), then all
    second choices, and so on; an assignment whose queue position is ``>= C`` is dropped, and
    the kept ones are combined with weight ``g[s, e]`` (no renormalisation, so a fully dropped
    token outputs zero and only the residual carries it).

    Args:
      logits: ``(G, S, E)`` router logits.
      num_selected_experts: ``K``, with ``1 <= K <= E``.
      capacity_factor: ``C = ceil(S * K * capacity_factor / E)`` rounded up to a multiple of
        ``capacity_multiple_of``. Give this or ``capacity``, not both.
      capacity: explicit ``C``.
      capacity_multiple_of: rounding of the computed capacity (``None``/0: none).
      batch_priority: batch-prioritised routing (BPR).
      noise_std: noise scale; the logit noise has standard deviation ``noise_std / E``.
      noise: optional ``(G, S, E)`` standard-normal tensor used instead of drawing one.
      rng: key to draw the noise when ``noise`` is None and ``noise_std > 0``.

    Returns:
      A :class:`TopKRouting` with ``dispatch``/``combine`` (``(G, S, E, C)``, built on access),
      the compact index form and the per-group auxiliary losses.

    Example:
      >>> logits = jnp.zeros((1, 8, 4))
      >>> r = top_k_routing(logits, 2, capacity_factor=1.0)
      >>> r.dispatch.shape, r.capacity
      ((1, 8, 4, 4), 4)
    """
    _check_logits(logits)
    _, num_tokens, num_experts = logits.shape
    if not 1 <= num_selected_experts <= num_experts:
        raise ValueError(
            f"num_selected_experts={num_selected_experts!r} must be in [1, {num_experts}] "
            "(the number of experts)."
        )
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std!r} must be >= 0.")
    capacity = _resolve_capacity(
        num_tokens * num_selected_experts,
        num_experts,
        capacity_factor,
        capacity,
        capacity_multiple_of,
    )
    logits = logits.astype(jnp.float32)
    clean_gates = jax.nn.softmax(logits, axis=-1)
    if noise_std > 0:
        noisy, noise_scale = _noisy_logits(logits, noise_std, noise, rng)
        gates = jax.nn.softmax(noisy, axis=-1)
        load = load_loss(logits, noisy, noise_scale, num_selected_experts)
    else:
        gates, load = clean_gates, None

    weight, expert_index = jax.lax.top_k(gates, num_selected_experts)  # (G, S, K)
    expert_index = expert_index.astype(jnp.int32)
    position = jax.vmap(_queue_positions, in_axes=(0, 0, None, None))(
        expert_index, weight[..., 0], num_experts, batch_priority
    )
    return TopKRouting(
        gates=gates,
        expert_index=expert_index,
        position=position,
        valid=position < capacity,
        weight=weight,
        importance_loss=importance_loss(clean_gates),
        load_loss=load,
        gshard_loss=gshard_loss(gates),
        capacity=capacity,
        num_experts=num_experts,
    )


def _queue_positions(expert_index, top1_gate, num_experts, batch_priority):
    """Queue position of each (token, choice) of one group: ``(S, K) -> (S, K)`` int32."""
    if batch_priority:
        order = jnp.argsort(-top1_gate, stable=True)
        expert_index = expert_index[order]
    # Choice-major flattening: every first choice precedes every second choice.
    flat = expert_index.T.reshape(-1)
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    counts = jnp.cumsum(one_hot, axis=0) - 1
    position = jnp.take_along_axis(counts, flat[:, None], axis=1)[:, 0]
    position = position.reshape(expert_index.shape[::-1]).T
    if batch_priority:
        position = jnp.zeros_like(position).at[order].set(position)
    return position


def experts_choice_routing(
    logits: jax.Array,
    *,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    capacity_multiple_of: int | None = 4,
    noise_std: float = 0.0,
    noise: jax.Array | None = None,
    rng: jax.Array | None = None,
) -> ExpertsChoiceRouting:
    """Experts-choice routing (Zhou et al. 2022, https://arxiv.org/abs/2202.09368).

    ``g = softmax(logits + noise_std / E * noise)``; every expert fills its ``C`` slots with the
    ``C`` tokens of largest gate (ties to the lower token index); the combine weight is the gate.
    Loads are balanced by construction, a token may get any number of experts (including none),
    and there is no auxiliary loss.

    Args:
      logits: ``(G, S, E)`` router logits.
      capacity_factor: ``C = ceil(S * capacity_factor / E)`` rounded up to a multiple of
        ``capacity_multiple_of``. Give this or ``capacity``, not both.
      capacity: explicit ``C`` (``<= S``).
      capacity_multiple_of: rounding of the computed capacity.
      noise_std, noise, rng: optional logit noise, as in :func:`top_k_routing`.

    Returns:
      An :class:`ExpertsChoiceRouting`.

    Example:
      >>> r = experts_choice_routing(jnp.zeros((1, 8, 2)), capacity_factor=1.0)
      >>> r.token_index.shape
      (1, 2, 4)
    """
    _check_logits(logits)
    _, num_tokens, num_experts = logits.shape
    capacity = _resolve_capacity(
        num_tokens, num_experts, capacity_factor, capacity, capacity_multiple_of
    )
    if capacity > num_tokens:
        raise ValueError(
            f"Experts-choice capacity {capacity} exceeds the {num_tokens} tokens per group; "
            "lower capacity_factor/capacity or set capacity_multiple_of=1."
        )
    logits = logits.astype(jnp.float32)
    if noise_std > 0:
        logits, _ = _noisy_logits(logits, noise_std, noise, rng)
    gates = jax.nn.softmax(logits, axis=-1)
    weight, token_index = jax.lax.top_k(jnp.swapaxes(gates, 1, 2), capacity)
    return ExpertsChoiceRouting(
        gates=gates,
        token_index=token_index.astype(jnp.int32),
        weight=weight,
        capacity=capacity,
        num_experts=num_experts,
    )
