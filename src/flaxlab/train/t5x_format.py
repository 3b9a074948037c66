"""The pieces of T5X's on-disk checkpoint format: names (parameter paths, step folders),
zarr chunk shapes, and the flax.serialization-compatible msgpack of the ``checkpoint`` file
(nested dicts, Python scalars and NumPy arrays as flax's ndarray / complex / NumPy-scalar
extension types, large inline arrays split into chunks as flax splits them).
:mod:`flaxlab.train.t5x` writes and reads whole checkpoints with them."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

VERSION = 3  # T5X's msgpack format version (bfloat16 stored natively; 2 stored it as uint16)
CHECKPOINT_FILE = "checkpoint"  # the msgpack file inside checkpoint_<step>/
STEP_PREFIX = "checkpoint"  # T5X's default (gin-configurable) checkpoint prefix
DESIRED_CHUNK_SIZE_BYTES = 64 * 1024 * 1024  # T5X's target size of one zarr chunk
SEP = "/"  # separator of T5X parameter names ("target/encoder/.../kernel")

_STEP_DIR = re.compile(rf"{STEP_PREFIX}_(\d+)")
_TMP_DIR = re.compile(rf"{STEP_PREFIX}_(\d+)\.tmp-(\d+)")
_SPEC_KEYS = frozenset({"driver", "kvstore", "metadata"})

MSGPACK_MAX_CHUNK_BYTES = 2**30  # flax splits inline arrays above this into pieces
# flax.serialization's msgpack extension codes
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


# --------------------------------------------------------------------------- names


def is_ts_spec(value: Any) -> bool:
    """Whether a msgpack-tree node is a serialized TensorStore spec (T5X's test for it)."""
    return isinstance(value, Mapping) and _SPEC_KEYS <= set(value)


def _children(node: Any) -> list[tuple[str, Any]] | None:
    """``(key, child)`` pairs of an inner node, ``None`` for a leaf (spec dicts are leaves)."""
    if isinstance(node, Mapping) and not is_ts_spec(node):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, list | tuple):
        return [(str(i), v) for i, v in enumerate(node)]
    return None


def flatten_t5x(tree: Any, *, sep: str = SEP, keep_empty: bool = False) -> dict[str, Any]:
    """``{"target/encoder/layers_0/kernel": leaf, ...}``: T5X's parameter names.

    Lists and tuples count as dicts keyed ``"0"``, ``"1"``, ...; serialized TensorStore specs
    are leaves. Empty dicts are dropped unless ``keep_empty`` (then they are ``{}`` leaves).
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        children = _children(node)
        if children is None or (keep_empty and not children):
            if prefix in out:
                raise ValueError(f"two leaves are both named {prefix!r}")
            out[prefix] = {} if children is not None else node
            return
        for key, child in children:
            if sep in key:
                raise ValueError(f"key {key!r} contains the separator {sep!r}")
            walk(f"{prefix}{sep}{key}" if prefix else key, child)

    walk("", tree)
    return out


def unflatten_t5x(flat: Mapping[str, Any], *, sep: str = SEP) -> dict[str, Any]:
    """Inverse of :func:`flatten_t5x` (lists come back as dicts keyed ``"0"``, ``"1"``...)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split(sep)
        node = out
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name!r} lies below the leaf {key!r}")
        if last in node:
            raise ValueError(f"{name!r} is given twice")
        node[last] = value
    return out


def array_dir_name(name: str, *, sep: str = SEP) -> str:
    """The TensorStore directory of a parameter: ``target/a/kernel`` -> ``target.a.kernel``."""
    return name.replace(sep, ".")


def step_dir(directory: str | os.PathLike, step: int) -> Path:
    """``<directory>/checkpoint_<step>``."""
    return Path(directory) / f"{STEP_PREFIX}_{int(step)}"


def t5x_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints (those with their msgpack file) under ``directory``."""
    return sorted(s for s, d in _step_dirs(Path(directory)).items() if _complete(d))


def _step_dirs(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    found = {}
    for entry in directory.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def _complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / CHECKPOINT_FILE).is_file()


# --------------------------------------------------------------------------- chunks


def choose_chunk_shape(
    write_shape: tuple[int, ...] | list[int], target_elements: float
) -> list[int]:
    """T5X's zarr chunk shape: per dimension a divisor of its size, as large as possible while
    the chunk holds at most ``target_elements``; greedily shrinks the currently largest
    dimension (the first one on ties) to its next smaller divisor."""
    if target_elements < 1:
        raise ValueError(f"target_elements must be >= 1, got {target_elements}")
    # Divisors of each size, smallest first; the current chunk takes the last one. (A
    # zero-sized dimension gets chunk 1: zarr chunks must be positive; T5X does not handle it.)
    divisors = [[d for d in range(1, n + 1) if n % d == 0] or [1] for n in write_shape]

    def chunk() -> list[int]:
        return [ds[-1] for ds in divisors]

    while math.prod(chunk()) > target_elements:
        sizes = chunk()
        largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
        divisors[largest].pop()
    return chunk()


# --------------------------------------------------------------------------- msgpack


def _sorted_tree(node: Any) -> Any:
    """Dict keys in sorted order, as jax's tree_map leaves T5X's state dict."""
    if isinstance(node, dict) and not is_ts_spec(node):
        return {k: _sorted_tree(node[k]) for k in sorted(node)}
    return node


def _dtype_from_name(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, float8_*, int4...: numpy knows them only via ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))


def _ndarray_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise TypeError(f"cannot store an array of dtype {arr.dtype} in a T5X checkpoint")
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    packed = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)
    assert packed is not None
    return packed


def _pack_ext(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, _ndarray_bytes(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _ndarray_bytes(np.asarray(obj)))
    if isinstance(obj, complex):
        return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb((obj.real, obj.imag)))
    raise TypeError(f"cannot store a {type(obj).__name__} in a T5X msgpack file")


def _unpack_ndarray(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    dtype = _dtype_from_name(dtype_name.decode())
    return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _unpack_ndarray(data)
    if code == _EXT_NPSCALAR:
        return _unpack_ndarray(data)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _chunk_inline(arr: np.ndarray) -> Any:
    """flax's form of an inline array too large for one msgpack object."""
    if arr.nbytes <= MSGPACK_MAX_CHUNK_BYTES:
        return arr
    per_chunk = max(1, MSGPACK_MAX_CHUNK_BYTES // arr.dtype.itemsize)
    flat = arr.reshape(-1)
    pieces = [flat[i : i + per_chunk] for i in range(0, flat.size, per_chunk)]
    return {
        _CHUNKED: True,
        "shape": {str(i): n for i, n in enumerate(arr.shape)},
        "chunks": {str(i): p for i, p in enumerate(pieces)},
    }


def _unchunk_inline(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get(_CHUNKED) is True:
            shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
            pieces = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
            return np.concatenate(pieces).reshape(shape)
        return {k: _unchunk_inline(v) for k, v in node.items()}
    return node


def encode_msgpack(contents: Mapping[str, Any]) -> bytes:
    """flax.serialization-compatible msgpack bytes of a tree of dicts, scalars and arrays."""
    packed = msgpack.packb(contents, default=_pack_ext, strict_types=True, use_bin_type=True)
    assert packed is not None
    return packed


def decode_msgpack(data: bytes) -> Any:
    """Inverse of :func:`encode_msgpack` (flax's ``msgpack_restore``)."""
    tree = msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=False)
    return _unchunk_inline(tree)
