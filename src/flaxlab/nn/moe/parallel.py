"""Expert parallelism: the MoE MLP with experts sharded over a mesh axis.

Groups of tokens and experts are both split over the ``n`` devices of the expert axis. Inside
:func:`jax.shard_map` every device routes its own groups and fills the ``(G/n, E, C, D)`` expert
buffers; one :func:`jax.lax.all_to_all` sends each device the slots of the experts it holds
(``(E/n, n * G/n * C, D)``), the local experts run, and a second all-to-all returns the outputs
to the devices that own the tokens, which combine them. Routing is per group, so the result equals
the single-device computation; auxiliary losses and metrics are averaged over all groups with
``pmean``.

This replaces the reference's ``with_sharding_constraint`` reshapes (whose expert all-to-all did
not run on GPU, google-research/vmoe issue #2) by explicit collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxlab.nn.moe.dispatch import combine, dispatch
from flaxlab.nn.moe.experts import expert_mlp


def expert_parallel_moe_mlp(
    params: Mapping[str, jax.Array],
    router_kernel: jax.Array,
    x: jax.Array,
    noise: jax.Array | None,
    *,
    route: Callable,
    metrics_fn: Callable,
    kind: str,
    mesh: jax.sharding.Mesh,
    axis_name: str = "expert",
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Routes, dispatches, runs experts sharded over ``axis_name`` and combines.

    Args:
      params: expert parameters (``fc1_kernel`` ``(E, D, H)``, ...); ``E`` is split over the axis.
      router_kernel: ``(D, E)`` router kernel (replicated).
      x: ``(G, S, D)`` token groups; ``G`` is split over the axis.
      noise: ``(G, S, E)`` standard-normal router noise, or None.
      route: ``(logits, noise=...) -> routing`` (e.g. a partial of ``top_k_routing``).
      metrics_fn: ``routing -> dict`` of group-averaged metrics (e.g. ``routing_metrics``).
      kind: ``"einsum"`` or ``"indices"`` (the dropless ``"ragged"`` path has variable-size
        exchanges and is single-device only).
      mesh: the device mesh.
      axis_name: the expert axis of ``mesh``.
      dropout_rate, dropout_key: dropout inside the experts; each device draws its masks from
        ``fold_in(dropout_key, device index on the axis)``.

    Returns:
      ``(y, metrics)`` with ``y`` of shape ``(G, S, O)``.
    """
    if kind not in ("einsum", "indices"):
        raise ValueError(
            f"Expert-parallel dispatch_kind={kind!r} is not supported; accepted: "
            "('einsum', 'indices')."
        )
    shards = mesh.shape[axis_name]
    num_groups = x.shape[0]
    num_experts = router_kernel.shape[1]
    if num_groups % shards or num_experts % shards:
        raise ValueError(
            f"groups ({num_groups}) and experts ({num_experts}) must both be multiples of the "
            f"{shards} devices on mesh axis {axis_name!r}."
        )

    def local(params, router_kernel, x, noise, key):
        routing = route(x @ router_kernel, noise=noise)
        buffer = dispatch(x, routing, kind)  # (g, E, C, D) for the local groups g
        groups, _, capacity, dim = buffer.shape
        local_experts = num_experts // shards
        # (g, E, C, D) -> (n, E/n, g, C, D): chunk i goes to the device holding experts chunk i.
        buffer = buffer.reshape(groups, shards, local_experts, capacity, dim)
        buffer = buffer.transpose(1, 2, 0, 3, 4)
        buffer = jax.lax.all_to_all(buffer, axis_name, 0, 0, tiled=True)
        # Now axis 0 is the source device: (n, E/n, g, C, D) -> (E/n, n * g * C, D).
        expert_in = buffer.transpose(1, 0, 2, 3, 4).reshape(local_experts, -1, dim)
        if key is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        expert_out = expert_mlp(params, expert_in, dropout_rate=dropout_rate, dropout_key=key)
        out_dim = expert_out.shape[-1]
        expert_out = expert_out.reshape(local_experts, shards, groups, capacity, out_dim)
        expert_out = jax.lax.all_to_all(
            expert_out.transpose(1, 0, 2, 3, 4), axis_name, 0, 0, tiled=True
        )
        # Axis 0 is now the expert chunk: (n, E/n, g, C, O) -> (g, E, C, O).
        expert_out = expert_out.transpose(2, 0, 1, 3, 4).reshape(groups, -1, capacity, out_dim)
        y = combine(expert_out, routing, kind)
        metrics = jax.tree.map(lambda m: jax.lax.pmean(m, axis_name), metrics_fn(routing))
        return y, metrics

    params = {name: _place(value, mesh, P(axis_name)) for name, value in params.items()}
    router_kernel = _place(router_kernel, mesh, P())
    x = _place(x, mesh, P(axis_name))
    noise = None if noise is None else _place(noise, mesh, P(axis_name))
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            {name: P(axis_name) for name in params},
            P(),
            P(axis_name),
            None if noise is None else P(axis_name),
            None if dropout_key is None else P(),
        ),
        out_specs=(P(axis_name), P()),
    )
    return sharded(params, router_kernel, x, noise, dropout_key)


def _place(value, mesh, spec):
    """Lays ``value`` out as ``spec`` (reshard on Explicit meshes, a constraint on Auto ones)."""
    sharding = NamedSharding(mesh, spec)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(value, sharding)
    return jax.lax.with_sharding_constraint(value, sharding)
