"""The partitioned checkpoint format of google-research/vmoe (``vmoe/checkpoints/partitioned.py``):
``<prefix>.index`` (the tree, each array's shape, dtype and chunks) and
``<prefix>.data-<i>-of-<n>`` shards, read with msgpack and NumPy alone (``ml_dtypes`` for
bfloat16). :mod:`flaxlab.models.vmoe_checkpoints` maps what this reads onto a flaxlab V-MoE; its
docstring describes the format in full."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

# Versions of the index written by the reference (``partitioned.py``, ``Version``).
INDEX_VERSIONS = (None, "20220622")
_CHUNKS_MARKER = "__msgpack_array_chunk_a87ca2__"  # data shards (serialization.py)
# msgpack extension type codes of the reference's serializer.
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_EXT_SHAPED_ARRAY, _EXT_SLICE, _EXT_SLICE_ND, _EXT_INDEX_INFO = 4, 5, 6, 8

Slices = tuple[tuple[int, int], ...]  # (start, stop) per axis


class _DecodeError(ValueError):
    """A malformed entry inside a msgpack file (raised through msgpack's hooks)."""


@dataclasses.dataclass(frozen=True)
class ChunkedArrayInfo:
    """One array of a partitioned checkpoint, as the index describes it.

    Attributes:
      shape: global shape.
      dtype: NumPy dtype (``ml_dtypes.bfloat16`` for bfloat16).
      slices: the ``(start, stop)`` ranges per axis of each stored chunk.
      shards: the shard holding each chunk.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    slices: tuple[Slices, ...]
    shards: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VMoEIndex:
    """The ``.index`` file: the tree of :class:`ChunkedArrayInfo`, the shard count, the version."""

    tree: dict
    shard_count: int
    version: str | None


# ----------------------------------------------------------------------------------------------
# Decoding the reference's msgpack extensions.


def _dtype(name) -> np.dtype:
    name = name.decode() if isinstance(name, bytes) else str(name)
    try:
        return np.dtype(name)
    except TypeError:
        pass
    extra = getattr(ml_dtypes, name, None)  # bfloat16, float8_*, int4, ...
    if extra is None:
        raise _DecodeError(f"V-MoE checkpoint: unknown array dtype {name!r}")
    return np.dtype(extra)


def _unpack_raw(data: bytes):
    return msgpack.unpackb(data, raw=True)


def _decode_ndarray(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = _unpack_raw(data)
    return np.frombuffer(buffer, dtype=_dtype(dtype_name)).reshape(tuple(shape))


def _decode_slice(data: bytes) -> tuple[int | None, int | None]:
    start, stop, step = _unpack_raw(data)
    if step not in (None, 1):
        raise _DecodeError(f"V-MoE checkpoint: strided slice (step {step}) is not supported")
    return start, stop


def _decode_slice_nd(data: bytes) -> tuple[tuple[int | None, int | None], ...]:
    return tuple(_decode_slice(item) for item in _unpack_raw(data))


def _resolve(slices, shape) -> Slices:
    """Replaces open ends (``None``) by the array's bounds."""
    if len(slices) != len(shape):
        raise _DecodeError(f"V-MoE checkpoint: slices {slices} do not fit an array of {shape=}")
    return tuple(
        (0 if a is None else int(a), n if b is None else int(b)) for (a, b), n in zip(slices, shape)
    )


def _decode_index_info(data: bytes) -> ChunkedArrayInfo:
    shaped, slices, shards = _unpack_raw(data)
    shape, dtype_name = _unpack_raw(shaped)[:2]  # (shape, dtype, weak_type, named_shape)
    shape = tuple(int(n) for n in shape)
    chunks = tuple(_resolve(_decode_slice_nd(s), shape) for s in slices)
    if len(chunks) != len(shards):
        raise _DecodeError("V-MoE checkpoint: an index entry has unequal slice and shard counts")
    return ChunkedArrayInfo(shape, _dtype(dtype_name), chunks, tuple(int(s) for s in shards))


def _ext_hook(code: int, data: bytes):
    if code == _EXT_NDARRAY:
        return _decode_ndarray(data)
    if code == _EXT_NPSCALAR:
        return _decode_ndarray(data)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    if code == _EXT_SLICE:
        return _decode_slice(data)
    if code == _EXT_SLICE_ND:
        return _decode_slice_nd(data)
    if code == _EXT_SHAPED_ARRAY:
        shape, dtype_name = _unpack_raw(data)[:2]
        return tuple(shape), _dtype(dtype_name)
    if code == _EXT_INDEX_INFO:
        return _decode_index_info(data)
    return msgpack.ExtType(code, data)


def _read_msgpack(path: str):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except _DecodeError as e:
        raise ValueError(f"{path!r}: {e}") from None
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise ValueError(f"{path!r} is not a msgpack file of a V-MoE checkpoint ({e})") from None


# ----------------------------------------------------------------------------------------------
# Reading.


def _strip_prefix(prefix) -> str:
    prefix = os.fspath(prefix)
    return prefix[: -len(".index")] if prefix.endswith(".index") else prefix


def shard_path(prefix, shard: int, shard_count: int) -> str:
    """The file of one data shard: ``<prefix>.data-00001-of-00004``."""
    return f"{_strip_prefix(prefix)}.data-{shard:05d}-of-{shard_count:05d}"


def read_vmoe_index(prefix) -> VMoEIndex:
    """Reads ``<prefix>.index`` (``prefix`` may end with ``.index``) without any array data."""
    prefix = _strip_prefix(prefix)
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise ValueError(f"V-MoE checkpoint index {path!r} does not exist")
    content = _read_msgpack(path)
    if not isinstance(content, dict) or "index" not in content or "shard_count" not in content:
        raise ValueError(f"{path!r} is not a V-MoE checkpoint index (no 'index'/'shard_count')")
    version = content.get("version")
    if version not in INDEX_VERSIONS:
        raise ValueError(
            f"{path!r} has index version {version!r}; supported: {list(INDEX_VERSIONS)}"
        )
    tree = content["index"]
    if not isinstance(tree, dict):
        raise ValueError(f"{path!r}: the saved tree is not a mapping")
    return VMoEIndex(tree, int(content["shard_count"]), version)


def _leaves(tree, path=()):
    """``(path, leaf)`` in the order of ``jax.tree_util.tree_flatten`` (sorted dict keys)."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key], (*path, str(key)))
    elif tree is not None:
        yield path, tree


def flatten_vmoe_tree(tree: Mapping) -> dict[str, Any]:
    """A nested tree as a flat dict keyed by ``/``-joined paths (``Encoder/encoder_norm/bias``)."""
    return {"/".join(path): leaf for path, leaf in _leaves(dict(tree))}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def read_vmoe_checkpoint(prefix, *, subtree: str | None = None) -> dict:
    """Reads a partitioned V-MoE checkpoint into a nested dict of full NumPy arrays.

    Args:
      prefix: the path without suffix (``.../vmoe_b16_imagenet21k_randaug_strong``); the
        ``.index`` file and every ``.data-<i>-of-<n>`` shard must lie next to each other.
      subtree: a ``/``-joined key path to read only part of the tree (e.g. ``"params"`` of a
        training checkpoint); shards holding nothing of it are not opened.

    Returns:
      The saved tree (string keys), each array reassembled from its chunks, in its stored dtype
      (``ml_dtypes.bfloat16`` for bfloat16).
    """
    prefix = _strip_prefix(prefix)
    index = read_vmoe_index(prefix)
    leaves = list(_leaves(index.tree))
    for path, info in leaves:
        if not isinstance(info, ChunkedArrayInfo):
            raise ValueError(
                f"{prefix}.index: entry {'/'.join(path)} is {type(info).__name__}, not an array"
            )
    want = tuple(subtree.strip("/").split("/")) if subtree else ()
    selected = {i for i, (path, _) in enumerate(leaves) if path[: len(want)] == want}
    if not selected:
        raise ValueError(f"V-MoE checkpoint {prefix!r} has no {subtree!r} in its tree")
    arrays: dict[int, np.ndarray] = {}
    placed: dict[int, set[Slices]] = {i: set() for i in selected}
    by_shard: dict[int, set[int]] = {}
    for i in selected:
        info = leaves[i][1]
        arrays[i] = np.empty(info.shape, info.dtype)
        for shard in info.shards:
            if not 0 <= shard < index.shard_count:
                raise ValueError(
                    f"{prefix}.index: {'/'.join(leaves[i][0])} names shard {shard} of "
                    f"{index.shard_count}"
                )
            by_shard.setdefault(shard, set()).add(i)
    for shard in sorted(by_shard):
        path = shard_path(prefix, shard, index.shard_count)
        if not os.path.isfile(path):
            raise ValueError(
                f"V-MoE checkpoint shard {path!r} is missing ({index.shard_count} shards expected)"
            )
        content = _read_msgpack(path)
        if not isinstance(content, dict) or content.get(_CHUNKS_MARKER) is not True:
            raise ValueError(f"{path!r} is not a data shard of a V-MoE checkpoint")
        for key, chunks in content.items():
            if key == _CHUNKS_MARKER:
                continue
            i = int(key)
            if i >= len(leaves):
                raise ValueError(f"{path!r} holds array #{i}; the index has {len(leaves)}")
            if i in selected:
                for subchunks, slices in chunks:
                    region = _place(arrays[i], leaves[i], subchunks, slices, shard, path)
                    if region in placed[i]:
                        raise ValueError(f"{path!r} holds a chunk of array #{i} twice")
                    placed[i].add(region)
    for i in selected:
        info = leaves[i][1]
        covered = sum(_size([b - a for a, b in r]) for r in info.slices)
        if placed[i] != set(info.slices) or covered != arrays[i].size:
            raise ValueError(
                f"V-MoE checkpoint {prefix!r}: the shards hold {len(placed[i])} of the "
                f"{len(info.slices)} chunks of {'/'.join(leaves[i][0])}"
            )
    tree: dict = {}
    for i in sorted(selected):
        _set(tree, leaves[i][0], arrays[i])
    for key in want:
        tree = tree[key]
    return tree


def _place(array, leaf, subchunks, slices, shard: int, path: str) -> Slices:
    """Copies one chunk into its array, checked against the index; returns its region."""
    name, info = "/".join(leaf[0]), leaf[1]
    region = _resolve(slices, info.shape) if len(slices) == len(info.shape) else None
    expected = {s for s, k in zip(info.slices, info.shards) if k == shard}
    if region is None or region not in expected:
        raise ValueError(
            f"{path!r}: a chunk of {name} covers {slices}, which the index does not "
            "assign to this shard (was the checkpoint written from a tree that is not nested "
            "dicts?)"
        )
    shape = tuple(b - a for a, b in region)
    pieces = [np.asarray(c).reshape(-1) for c in subchunks]
    flat = np.concatenate(pieces) if len(pieces) > 1 else (pieces[0] if pieces else np.empty(0))
    if flat.size != _size(shape) or (flat.size and flat.dtype != info.dtype):
        raise ValueError(
            f"{path!r}: a chunk of {name} holds {flat.size} {flat.dtype} values; the index "
            f"expects {_size(shape)} {info.dtype}"
        )
    array[tuple(slice(a, b) for a, b in region)] = flat.reshape(shape)
    return region
