"""The device mesh, sharding rules as data, and the multi-host start.

The mesh has four named axes: ``data`` (batch), ``fsdp`` (batch, and parameters split along
one dimension: fully sharded data parallelism), ``model`` (tensor parallelism: attention heads
and MLP hidden units) and ``expert`` (MoE experts; the batch too). ``mesh.data=2
mesh.fsdp=4`` on 8 devices; ``-1`` takes what the others leave.

Which dimension of a parameter goes on which mesh axis is data, in two tables:

* :data:`PARAM_RULES`: parameter name (regex on the ``/``-joined path) -> logical axis names,
  one per dimension; a variable's own ``out_sharding`` metadata (the MoE experts') comes first.
* :data:`LOGICAL_RULES`: logical axis name -> mesh axis.

A mesh axis of size 1, or one that does not divide the dimension, is dropped (replicated
instead). With ``fsdp > 1``, a parameter whose rules left ``fsdp`` unused is split along its
largest dimension that ``fsdp`` divides. Optimizer slots follow their parameter (a slot whose
path ends with a parameter's path and has its shape; Amos's packed vectors are replicated);
the EMA follows the parameters. XLA's SPMD partitioner derives every collective from these
shardings, so a model trains the same function under any layout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis name -> mesh axis (None: replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "batch": None,  # the batch spans BATCH_AXES
    "embed": "fsdp",
    "heads": "model",
    "mlp": "model",
    "expert": "expert",
    "vocab": None,
}

# parameter path (regex, searched in the "/"-joined path) -> logical axes of its dimensions.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(query|key|value)/kernel$", ("embed", "heads")),
    (r"(query|key|value)/bias$", ("heads",)),
    (r"attn/out/kernel$", ("heads", "embed")),
    (r"(mlp|mixing)/fc1/kernel$", ("embed", "mlp")),
    (r"(mlp|mixing)/fc1/bias$", ("mlp",)),
    (r"(mlp|mixing)/fc2/kernel$", ("mlp", "embed")),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis; their product is the number of devices, ``-1`` (at most one
    axis) takes the rest. Default: every device on ``data``."""

    data: int = -1
    fsdp: int = 1
    model: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: each axis is a positive size, and at "
                "most one is -1 (the rest)"
            )

    def shape(self, num_devices: int) -> dict[str, int]:
        """Each axis's size on ``num_devices`` devices."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {sizes} does not fit {num_devices} devices: {fixed} does not "
                    f"divide {num_devices}"
                )
            sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are "
                f"{num_devices}; make the product equal or set one axis to -1"
            )
        return sizes


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts JAX's multi-host runtime (``jax.distributed.initialize``) once.

    The arguments, else the ``FLAXLAB_COORDINATOR``, ``FLAXLAB_NUM_PROCESSES`` and
    ``FLAXLAB_PROCESS_ID`` environment variables; with none of them, JAX's own detection of
    the cluster (SLURM, Open MPI, Kubernetes, TPU pods, ``JAX_COORDINATOR_ADDRESS``...).
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator = coordinator or env.get("FLAXLAB_COORDINATOR")
    if num_processes is None and env.get("FLAXLAB_NUM_PROCESSES"):
        num_processes = int(env["FLAXLAB_NUM_PROCESSES"])
    if process_id is None and env.get("FLAXLAB_PROCESS_ID"):
        process_id = int(env["FLAXLAB_PROCESS_ID"])
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "a multi-host run needs all of --coordinator HOST:PORT, --num-processes and "
            f"--process-id (or FLAXLAB_* variables); got coordinator={coordinator!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id)


def maybe_initialize_distributed() -> None:
    """Starts the multi-host runtime when ``FLAXLAB_COORDINATOR`` is set in the environment."""
    if os.environ.get("FLAXLAB_COORDINATOR"):
        initialize_distributed()


def make_mesh(config: MeshConfig | None = None, num_devices: int | None = None) -> Mesh:
    """The ``(data, fsdp, model, expert)`` mesh over the first ``num_devices`` devices (all by
    default; every device of every process on several hosts)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but only {len(devices)} are available")
    sizes = (config or MeshConfig()).shape(n)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:n]
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch split over ``data``, ``fsdp`` and ``expert`` (replicated over ``model``)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------- parameters


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def logical_axes(name: str, ndim: int, metadata=None) -> tuple[str | None, ...]:
    """A parameter's logical axis per dimension: its ``out_sharding`` metadata, else the first
    :data:`PARAM_RULES` entry whose pattern it matches (with its rank), else none."""
    if metadata and isinstance(metadata, tuple) and len(metadata) == ndim:
        return tuple(metadata)
    for pattern, axes in PARAM_RULES:
        if len(axes) == ndim and re.search(pattern, name):
            return axes
    return (None,) * ndim


def spec_for(shape, axes, mesh: Mesh) -> P:
    """The mesh axes of one array: each logical axis mapped by :data:`LOGICAL_RULES`, kept
    where the mesh axis has several devices and divides the dimension; then FSDP on the
    largest dimension ``fsdp`` divides if the rules left it unused."""
    out: list[str | None] = []
    for dim, logical in zip(shape, axes, strict=True):
        axis = LOGICAL_RULES.get(logical) if isinstance(logical, str) else None
        size = mesh.shape.get(axis, 1) if axis else 1
        out.append(axis if axis and size > 1 and dim % size == 0 and axis not in out else None)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in out:
        free = [i for i, (d, a) in enumerate(zip(shape, out, strict=True)) if a is None]
        free = [i for i in free if shape[i] % fsdp == 0 and shape[i] >= fsdp]
        if free:
            out[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*out)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _metadata(params) -> dict[str, Any]:
    """Each variable's ``out_sharding`` metadata by path name."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable):
        if isinstance(leaf, nnx.Variable):
            names = getattr(leaf, "out_sharding", None)
            out[_path_name(path)] = names
    return out


def _array_name(path) -> str:
    """A leaf array's path name, without the ``value`` of the variable that holds it."""
    return _path_name(path).removesuffix("/value")


def param_specs(params, mesh: Mesh):
    """A :class:`PartitionSpec` per parameter array, in the structure of ``params`` (an
    ``nnx.State`` or any pytree of arrays)."""
    metadata = _metadata(params)

    def spec(path, value):
        name = _array_name(path)
        axes = logical_axes(name, np.ndim(value), metadata.get(name))
        return spec_for(np.shape(value), axes, mesh)

    return jax.tree_util.tree_map_with_path(spec, params)


def state_shardings(state: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """A :class:`NamedSharding` per leaf of a training state (``params``, ``rest``,
    ``opt_state``, ``step``, ``ema``), in its structure: parameters by the rules, the EMA like
    them, optimizer slots like the parameter they mirror (replicated otherwise), the rest
    replicated."""
    specs = param_specs(state["params"], mesh)
    by_name = {
        _array_name(path): (spec, np.shape(value))
        for (path, value), spec in zip(
            jax.tree_util.tree_leaves_with_path(state["params"]),
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
            strict=True,
        )
    }
    names = sorted(by_name, key=len, reverse=True)

    def slot(path, value):
        name, shape = _array_name(path), np.shape(value)
        for param in names:
            spec, param_shape = by_name[param]
            if (name == param or name.endswith("/" + param)) and shape == param_shape:
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    named = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    out = {k: jax.tree.map(lambda _: NamedSharding(mesh, P()), v) for k, v in state.items()}
    out["params"] = named
    if "ema" in state:
        out["ema"] = named
    out["opt_state"] = jax.tree_util.tree_map_with_path(slot, state["opt_state"])
    return out


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """The rows of a global batch of ``batch_size`` that this process's devices hold, in
    order (every row on one host)."""
    if jax.process_count() == 1:
        return np.arange(batch_size)
    sharding = batch_sharding(mesh)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(batch_size)[index[0]] if index else range(batch_size))
    return np.asarray(sorted(rows), np.int64)


def shard_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, *, local: bool = False
) -> dict[str, jax.Array]:
    """Places a batch on the mesh, split along the batch axes.

    ``batch`` is the global batch, of which each host keeps the rows its devices hold
    (:func:`process_rows`); with ``local=True`` it is already this host's rows (the data
    pipeline read only those).
    """
    sharding = batch_sharding(mesh)
    devices = batch_devices(mesh)
    hosts = jax.process_count()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        rows = value.shape[0] * (hosts if local else 1)
        if rows % devices:
            raise ValueError(
                f"batch of {rows} examples cannot be split over {devices} devices; "
                f"use a batch size divisible by {devices}"
            )
        if hosts == 1:
            out[key] = jax.device_put(value, sharding)  # the cheaper path on one host
            continue
        if not local:
            value = value[process_rows(mesh, rows)]
        out[key] = jax.make_array_from_process_local_data(sharding, value, (rows, *value.shape[1:]))
    return out


def is_primary() -> bool:
    """Whether this is process 0, the one that writes metrics, status and plots."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
