"""Device mesh, the rule table from logical parameter axes to mesh axes, multi-host start.

The estimator runs data-parallel over every device: the batch is split along the ``data`` mesh
axis and parameters are replicated, except where a parameter carries logical axis names
(``nnx.with_partitioning``) that :data:`LOGICAL_RULES` maps to another mesh axis (MoE experts
on ``expert``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# logical axis name -> mesh axis (None: replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "expert": "expert",
    "embed": None,
    "mlp": None,
    "heads": None,
    "vocab": None,
}


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-host runtime when a coordinator is configured.

    Set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or run under
    a cluster environment JAX detects, such as SLURM) before starting ``flaxlab train``.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None, expert: int = 1) -> Mesh:
    """A ``(data, expert)`` mesh over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but only {len(devices)} are available")
    if n % expert:
        raise ValueError(f"{n} devices cannot be split into expert groups of {expert}")
    return jax.make_mesh(
        (n // expert, expert),
        ("data", "expert"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:n],
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def param_shardings(state, mesh: Mesh):
    """A sharding per leaf of an ``nnx.State``: from its logical axis names, else replicated."""

    def spec(variable):
        names = getattr(variable, "out_sharding", None) or getattr(variable, "sharding_names", None)
        if not names or not isinstance(names, tuple):
            return NamedSharding(mesh, P())
        axes = [LOGICAL_RULES.get(n) if isinstance(n, str) else None for n in names]
        axes = [a if a in mesh.axis_names and mesh.shape[a] > 1 else None for a in axes]
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along ``data``.

    On several hosts each host passes its own slice; the global batch is their concatenation.
    """
    sharding = batch_sharding(mesh)
    data_size = mesh.shape["data"]
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % data_size:
            raise ValueError(
                f"batch of {value.shape[0]} examples cannot be split over {data_size} devices; "
                f"use a batch size divisible by {data_size}"
            )
        if jax.process_count() == 1:
            out[key] = jax.device_put(value, sharding)  # the cheaper path on one host
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
