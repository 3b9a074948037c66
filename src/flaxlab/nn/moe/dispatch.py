"""Dispatch tokens to experts and combine their outputs, three ways.

Shapes: tokens ``x`` are ``(G, S, D)``; an expert buffer is ``(G, E, C, D)`` (slot ``c`` of expert
``e`` for group ``g``); routing comes from :mod:`flaxlab.nn.moe.routing`.

``dispatch_kind``:

* ``"einsum"``: the V-MoE reference's one-hot einsums with the ``(G, S, E, C)`` dispatch and
  combine tensors. Memory and FLOPs grow as ``S * E * C ~ S**2 * K * capacity_factor`` per group.
* ``"indices"``: gathers with the compact (expert, position) indices; linear in ``S``.
  Identical outputs to ``"einsum"``. Both directions of the token <-> slot maps are kept, so
  the backward passes are gathers too (no scatter-add, which is slow on CPU and GPU).
* ``"ragged"``: dropless (top-k routing only): every assignment is processed, whatever the
  capacity, by sorting the ``S * K`` assignments by expert and running the expert MLP as grouped
  matmuls (:func:`jax.lax.ragged_dot`). Equal to the other two wherever no assignment is dropped.

The expert MLP in between is :func:`flaxlab.nn.moe.experts.expert_mlp` (with dropout while
training when given a key).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flaxlab.nn.moe.experts import dropout, expert_mlp
from flaxlab.nn.moe.routing import ExpertsChoiceRouting, TopKRouting

DISPATCH_KINDS = ("einsum", "indices", "ragged")

Routing = TopKRouting | ExpertsChoiceRouting


def check_dispatch_kind(kind: str, routing_kind: str = "top_k") -> None:
    """Raises ValueError for an unknown dispatch kind or ragged with experts-choice routing."""
    if kind not in DISPATCH_KINDS:
        raise ValueError(f"dispatch_kind={kind!r} is unknown; accepted: {DISPATCH_KINDS}.")
    if kind == "ragged" and routing_kind != "top_k":
        raise ValueError(
            "dispatch_kind='ragged' (dropless) needs top-k routing; experts-choice routing has "
            "a fixed load per expert, use 'indices' or 'einsum'."
        )


def dispatch(x: jax.Array, routing: Routing, kind: str = "indices") -> jax.Array:
    """Places tokens in the expert buffers: ``(G, S, D) -> (G, E, C, D)``; empty slots are 0.

    ``buffer[g, e, c] = sum_s dispatch[g, s, e, c] * x[g, s]``.

    Args:
      x: ``(G, S, D)`` tokens.
      routing: a :class:`TopKRouting` or :class:`ExpertsChoiceRouting`.
      kind: ``"einsum"`` or ``"indices"`` (the dropless path has no buffers).

    Returns:
      ``(G, E, C, D)`` expert inputs.
    """
    if kind == "einsum":
        return jnp.einsum("gsec,gsd->gecd", routing.dispatch.astype(x.dtype), x)
    if kind != "indices":
        raise ValueError(f"dispatch() takes kind 'einsum' or 'indices', not {kind!r}.")
    num_groups, num_tokens, dim = x.shape
    num_experts, capacity = routing.num_experts, routing.capacity
    if isinstance(routing, ExpertsChoiceRouting):
        token_of_slot = routing.token_index.reshape(num_groups, -1)
        buffer = jnp.take_along_axis(x, token_of_slot[..., None], axis=1)
        return buffer.reshape(num_groups, num_experts, capacity, dim)
    slot_of_choice, choice_of_slot = _slot_maps(routing)
    k = routing.expert_index.shape[-1]
    # Forward: slot <- its token (empty slots read past the end: zeros). Backward: each token
    # sums the gradients of its <= K slots, again a gather (no scatter-add).
    token_of_slot = jnp.where(
        choice_of_slot < num_groups * num_tokens * k, choice_of_slot // k, num_groups * num_tokens
    )
    buffer = _gather_rows(
        x.reshape(-1, dim), token_of_slot, slot_of_choice.reshape(num_groups * num_tokens, k)
    )
    return buffer.reshape(num_groups, num_experts, capacity, dim)


def combine(y: jax.Array, routing: Routing, kind: str = "indices") -> jax.Array:
    """Weighted sum of the expert outputs of each token: ``(G, E, C, O) -> (G, S, O)``.

    ``out[g, s] = sum_{e, c} combine[g, s, e, c] * y[g, e, c]``.

    Args:
      y: ``(G, E, C, O)`` expert outputs.
      routing: the routing that :func:`dispatch` used.
      kind: ``"einsum"`` or ``"indices"``.

    Returns:
      ``(G, S, O)`` combined outputs.
    """
    if kind == "einsum":
        return jnp.einsum("gsec,gecd->gsd", routing.combine.astype(y.dtype), y)
    if kind != "indices":
        raise ValueError(f"combine() takes kind 'einsum' or 'indices', not {kind!r}.")
    num_groups, num_experts, capacity, out_dim = y.shape
    flat = y.reshape(num_groups, num_experts * capacity, out_dim)
    if isinstance(routing, ExpertsChoiceRouting):
        num_tokens = routing.gates.shape[1]
        weighted = flat * routing.weight.reshape(num_groups, -1, 1).astype(y.dtype)
        return jax.vmap(lambda w, t: jnp.zeros((num_tokens, out_dim), y.dtype).at[t].add(w))(
            weighted, routing.token_index.reshape(num_groups, -1)
        )
    num_tokens, k = routing.expert_index.shape[1:]
    slot_of_choice, choice_of_slot = _slot_maps(routing)
    # Forward: each (token, choice) reads its slot (dropped: zeros); backward: each slot reads
    # the gradient of the one choice it holds.
    gathered = _gather_rows(flat.reshape(-1, out_dim), slot_of_choice, choice_of_slot[:, None])
    gathered = gathered.reshape(num_groups, num_tokens, k, out_dim)
    weight = jnp.where(routing.valid, routing.weight, 0.0).astype(y.dtype)
    return jnp.einsum("gsk,gskd->gsd", weight, gathered)


def _slot_maps(routing: TopKRouting) -> tuple[jax.Array, jax.Array]:
    """Flat indices between (group, token, choice) and (group, expert, slot), both directions.

    Returns ``slot_of_choice`` ``(G * S * K,)`` (``G * E * C`` where dropped) and
    ``choice_of_slot`` ``(G * E * C,)`` (``G * S * K`` where empty).
    """
    num_groups, num_tokens, k = routing.expert_index.shape
    slots_per_group = routing.num_experts * routing.capacity
    group = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]
    slot = group * slots_per_group + routing.expert_index * routing.capacity + routing.position
    slot = jnp.where(routing.valid, slot, num_groups * slots_per_group).reshape(-1)
    choice = jnp.arange(slot.shape[0], dtype=jnp.int32)
    choice_of_slot = (
        jnp.full((num_groups * slots_per_group,), slot.shape[0], jnp.int32)
        .at[slot]
        .set(choice, mode="drop")
    )
    return slot, choice_of_slot


@jax.custom_vjp
def _gather_rows(table: jax.Array, index: jax.Array, transpose_index: jax.Array) -> jax.Array:
    """``out[i] = table[index[i]]`` (zeros for ``index[i] >= len(table)``).

    ``transpose_index`` ``(len(table), R)`` lists, for every table row, the output rows that read
    it (``>= len(index)`` for none), so the gradient is a gather-and-sum instead of a scatter-add.
    """
    return jnp.take(table, index, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(table, index, transpose_index):
    return _gather_rows(table, index, transpose_index), (index, transpose_index)


def _gather_rows_bwd(residuals, grad_out):
    index, transpose_index = residuals
    grad = jnp.take(grad_out, transpose_index, axis=0, mode="fill", fill_value=0).sum(axis=1)
    return grad, None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def buffered_moe_mlp(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    routing: Routing,
    kind: str,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Dispatch (``kind``), expert MLP on ``(E, G * C, D)``, combine: ``(G, S, D) -> (G, S, O)``."""
    buffer = dispatch(x, routing, kind)
    num_groups, num_experts, capacity, dim = buffer.shape
    expert_in = jnp.swapaxes(buffer, 0, 1).reshape(num_experts, num_groups * capacity, dim)
    expert_out = expert_mlp(params, expert_in, dropout_rate=dropout_rate, dropout_key=dropout_key)
    expert_out = jnp.swapaxes(expert_out.reshape(num_experts, num_groups, capacity, -1), 0, 1)
    return combine(expert_out, routing, kind)


def dropless_moe_mlp(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    routing: TopKRouting,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Dropless top-k MoE MLP with grouped matmuls: ``(G, S, D) -> (G, S, O)``.

    All ``G * S * K`` assignments are sorted by expert (stable) and each expert's contiguous run
    is multiplied by its weights with :func:`jax.lax.ragged_dot`; outputs are weighted by the
    gates (``routing.weight``, capacity ignored) and summed over the ``K`` choices. Dropout as
    in :func:`~flaxlab.nn.moe.experts.expert_mlp`, on each assignment's rows.
    """
    if not isinstance(routing, TopKRouting):
        raise ValueError("dropless_moe_mlp needs a TopKRouting (top-k routing).")
    num_groups, num_tokens, dim = x.shape
    k = routing.expert_index.shape[-1]
    expert_flat = routing.expert_index.reshape(-1)
    order = jnp.argsort(expert_flat, stable=True)
    sorted_expert = expert_flat[order]
    group_sizes = jnp.bincount(expert_flat, length=routing.num_experts).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    # Token t feeds sorted rows inverse[t * K + j]; both gathers get gather-only gradients.
    tokens = _gather_rows(x.reshape(-1, dim), order // k, inverse.reshape(-1, k))
    h = jax.lax.ragged_dot(tokens, params["fc1_kernel"], group_sizes)
    k1, k2 = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h = jax.nn.gelu(h + params["fc1_bias"][sorted_expert], approximate=True)
    h = dropout(h, dropout_rate, k1)
    out = jax.lax.ragged_dot(h, params["fc2_kernel"], group_sizes)
    out = dropout(out + params["fc2_bias"][sorted_expert], dropout_rate, k2)
    out = _gather_rows(out, inverse, order[:, None]).reshape(num_groups, num_tokens, k, -1)
    return jnp.einsum("gsk,gskd->gsd", routing.weight.astype(out.dtype), out)


def moe_mlp(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    routing: Routing,
    kind: str = "indices",
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """The MoE MLP through the chosen dispatcher: ``(G, S, D) -> (G, S, O)``.

    Args:
      params: expert parameters (``fc1_kernel``, ``fc1_bias``, ``fc2_kernel``, ``fc2_bias``).
      x: ``(G, S, D)`` tokens.
      routing: from :func:`~flaxlab.nn.moe.routing.top_k_routing` or
        :func:`~flaxlab.nn.moe.routing.experts_choice_routing`.
      kind: ``"einsum"``, ``"indices"`` or ``"ragged"`` (dropless).
      dropout_rate, dropout_key: dropout inside the experts (none without a key).

    Returns:
      ``(G, S, O)``; a token whose assignments were all dropped gets zeros.
    """
    routing_kind = "top_k" if isinstance(routing, TopKRouting) else "experts_choice"
    check_dispatch_kind(kind, routing_kind)
    if kind == "ragged":
        return dropless_moe_mlp(
            params,
            x,
            routing,  # type: ignore[arg-type]  (checked: top-k routing)
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
        )
    return buffered_moe_mlp(
        params, x, routing, kind, dropout_rate=dropout_rate, dropout_key=dropout_key
    )
