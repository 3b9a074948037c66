"""Reading google-research/vmoe's released checkpoints and loading them into a flaxlab V-MoE.

The reference stores checkpoints in a partitioned format (``vmoe/checkpoints/partitioned.py``):

* ``<prefix>.index``: one msgpack map ``{"shard_count": n, "index": tree, "version": v}``
  (``version`` is ``"20220622"`` for files written since mid-2022 and absent in older ones,
  likely including the checkpoints released in early 2022; both are read). ``tree`` is the
  saved tree as nested maps with string keys; each leaf is a msgpack extension (type 8)
  holding the array's global shape and dtype, the global slices of its chunks and the shard
  that stores each chunk.
* ``<prefix>.data-<i:05d>-of-<n:05d>``: one msgpack map per shard,
  ``{"__msgpack_array_chunk_a87ca2__": True, "<leaf>": [[subchunks, slices], ...], ...}``
  where ``<leaf>`` is the position of the array among the tree's leaves (dict keys sorted, the
  order of ``jax.tree_util.tree_flatten``), ``subchunks`` are flat arrays (extension type 1:
  ``(shape, dtype name, C-order bytes)``) whose concatenation fills ``slices`` of the array.

A large array can be cut into several chunks stored in different shards;
:func:`read_vmoe_checkpoint` reassembles them. ``bfloat16`` arrays (dtype name
``"bfloat16"``) are read as ``ml_dtypes.bfloat16`` NumPy arrays. Only msgpack and NumPy (with
``ml_dtypes``, a JAX dependency, for bfloat16) are used: no TensorFlow, no vmoe.

The released checkpoints (``gs://vmoe_checkpoints/...``, downloaded with ``gsutil``) hold only
the model parameters of the reference's ``VisionTransformerMoe`` (``vmoe/nn/vit_moe.py``):
``embedding``, ``cls``, ``Encoder/posembed_input/pos_embedding``,
``Encoder/encoderblock_<i>/{LayerNorm_0, SelfAttention/{query,key,value,out}, LayerNorm_1}``,
then ``Mlp/Dense_{0,1}`` in dense blocks or ``Moe/Router/dense/kernel`` and
``Moe/Mlp/Dense_{0,1}`` (a leading expert axis) in MoE blocks, ``Encoder/encoder_norm``,
``pre_logits`` (when the model has a representation layer) and ``head``. Training checkpoints
of the reference (a whole train state) keep the parameters under ``params``; both load.

Example:
  >>> model = vmoe_from_checkpoint("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012")
  >>> # or, into a model configured for another task (head reset, position embedding resized):
  >>> params = read_vmoe_checkpoint("vmoe_s32_last2_ilsvrc2012_randaug_light1")
  >>> config = config_from_vmoe_params(params, num_classes=10, image_size=64)
  >>> model = load_vmoe_checkpoint(VMoE(config, rngs=nnx.Rngs(0)), params)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
from flax import nnx

from flaxlab.models.pretrained import assign_params, resize_posemb
from flaxlab.models.vmoe import MoeConfig, VMoE, VMoEConfig

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


# ----------------------------------------------------------------------------------------------
# Reference names -> flaxlab's VMoE tree.

BLOCK = "Encoder/encoderblock_{i}/"
POSEMB = "Encoder/posembed_input/pos_embedding"


def reference_arrays(params: Mapping) -> dict[str, Any]:
    """The reference's parameters as a flat ``/``-keyed dict, from a nested or flat tree.

    Of a training checkpoint (parameters under ``params``, next to the optimizer state), only
    the parameters are kept.
    """
    flat = {}
    for key, value in dict(params).items():
        if isinstance(value, Mapping):
            for sub, leaf in flatten_vmoe_tree(value).items():
                flat[f"{key}/{sub}"] = leaf
        else:
            flat[str(key)] = value
    if "embedding/kernel" not in flat and any(k.startswith("params/") for k in flat):
        flat = {k[len("params/") :]: v for k, v in flat.items() if k.startswith("params/")}
    return flat


class _Names:
    """Hands out reference arrays by name and remembers which were taken."""

    def __init__(self, arrays: dict[str, Any]):
        self.arrays, self.taken = arrays, set()

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __call__(self, name: str):
        if name not in self.arrays:
            raise ValueError(f"the V-MoE checkpoint lacks {name}")
        self.taken.add(name)
        return self.arrays[name]

    def dense(self, name: str) -> dict:
        return {"kernel": self(f"{name}/kernel"), "bias": self(f"{name}/bias")}

    def norm(self, name: str) -> dict:
        return {"scale": self(f"{name}/scale"), "bias": self(f"{name}/bias")}

    def check_all_taken(self) -> None:
        left = sorted(set(self.arrays) - self.taken)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise ValueError(
                f"V-MoE checkpoint parameter {left[0]} has no place in a flaxlab VMoE{more}"
            )


@dataclasses.dataclass(frozen=True)
class _Layout:
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int | None


def _layout(arrays: Mapping[str, Any]) -> _Layout:
    pattern = re.compile(r"Encoder/encoderblock_(\d+)/")
    found = {int(m.group(1)) for k in arrays for m in [pattern.match(k)] if m}
    num_layers = max(found) + 1 if found else 0
    if found != set(range(num_layers)):
        missing = sorted(set(range(num_layers)) - found)
        raise ValueError(f"the V-MoE checkpoint lacks encoder blocks {missing}")
    moe, experts = [], set()
    for i in range(num_layers):
        router = BLOCK.format(i=i) + "Moe/Router/dense/kernel"
        if router in arrays:
            moe.append(i)
            experts.add(int(arrays[router].shape[-1]))
    if len(experts) > 1:
        raise ValueError(f"the V-MoE checkpoint's MoE layers differ in expert count: {experts}")
    return _Layout(num_layers, tuple(moe), experts.pop() if experts else None)


def _check_no_map_head(arrays: Mapping[str, Any]) -> None:
    if any(k.startswith("MapHead/") for k in arrays):
        raise ValueError(
            "the V-MoE checkpoint uses the 'map' classifier (MapHead), which flaxlab's VMoE lacks"
        )


def vmoe_params_to_flaxlab(params: Mapping, config: VMoEConfig | None = None) -> dict:
    """Maps the reference's parameters to flaxlab's VMoE parameter tree (nested dicts).

    Attention kernels ``[D, heads, d]``/``[heads, d, D]`` become ``[D, D]``; expert MLPs keep
    their leading expert axis (``Moe/Mlp/Dense_0/kernel (E, D, H)`` -> ``experts.fc1_kernel``);
    the router kernel ``(D, E)`` is ``mlp.router.kernel``. With ``config``, the position
    embedding is resized to ``config.grid_size`` (bilinear, class token kept). Every reference
    parameter must find a place (a clear error names the first that does not).
    """
    arrays = reference_arrays(params)
    _check_no_map_head(arrays)
    take = _Names(arrays)
    layout = _layout(arrays)
    blocks = {}
    for i in range(layout.num_layers):
        b = BLOCK.format(i=i)
        att = b + "SelfAttention/"
        attn = {}
        for name in ("query", "key", "value"):
            kernel = take(f"{att}{name}/kernel")
            hidden = kernel.shape[0]
            attn[name] = {
                "kernel": kernel.reshape(hidden, -1),
                "bias": take(f"{att}{name}/bias").reshape(-1),
            }
        out = take(f"{att}out/kernel")
        attn["out"] = {
            "kernel": out.reshape(-1, out.shape[-1]),
            "bias": take(f"{att}out/bias"),
        }
        if i in layout.moe_layers:
            m = b + "Moe/"
            mlp = {
                "router": {"kernel": take(m + "Router/dense/kernel")},
                "experts": {
                    "fc1_kernel": take(m + "Mlp/Dense_0/kernel"),
                    "fc1_bias": take(m + "Mlp/Dense_0/bias"),
                    "fc2_kernel": take(m + "Mlp/Dense_1/kernel"),
                    "fc2_bias": take(m + "Mlp/Dense_1/bias"),
                },
            }
        else:
            mlp = {"fc1": take.dense(b + "Mlp/Dense_0"), "fc2": take.dense(b + "Mlp/Dense_1")}
        blocks[i] = {
            "norm1": take.norm(b + "LayerNorm_0"),
            "attn": attn,
            "norm2": take.norm(b + "LayerNorm_1"),
            "mlp": mlp,
        }
    tree: dict[str, Any] = {
        "embedding": take.dense("embedding"),
        "posemb": take(POSEMB),
        "encoder": {"blocks": blocks, "encoder_norm": take.norm("Encoder/encoder_norm")},
    }
    if "cls" in take:
        tree["cls"] = take("cls")
    if "pre_logits/kernel" in take:
        tree["pre_logits"] = take.dense("pre_logits")
    if "head/kernel" in take:
        tree["head"] = take.dense("head")
    take.check_all_taken()
    if config is not None:
        tree["posemb"] = _fit_posemb(tree["posemb"], config, num_prefix=int("cls" in tree))
    return tree


def _fit_posemb(posemb, config: VMoEConfig, num_prefix: int):
    grid = config.grid_size
    if posemb.shape[1] - num_prefix == grid[0] * grid[1]:
        return posemb
    posemb = np.asarray(posemb)
    if posemb.dtype not in (np.float32, np.float64):
        posemb = posemb.astype(np.float32)
    return resize_posemb(posemb, grid, num_prefix=num_prefix)


_MOE_FIELDS = {f.name for f in dataclasses.fields(MoeConfig)}


def config_from_vmoe_params(params: Mapping, **overrides) -> VMoEConfig:
    """Infers the :class:`~flaxlab.models.vmoe.VMoEConfig` of reference parameters.

    From the arrays: hidden size, patch size and channels (``embedding``), depth, heads, MLP
    width, MoE layers and experts, classes (``head``), representation size (``pre_logits``),
    classifier (``"token"`` with ``cls``, else ``"gap"``) and the image size (a square grid of
    position embeddings). Not stored in the arrays, hence the reference's V-MoE paper settings:
    ``num_selected_experts=2`` and the other :class:`~flaxlab.models.vmoe.MoeConfig` defaults,
    head bias ``-log(classes)``.

    ``overrides`` replace any field; :class:`MoeConfig` fields (``num_selected_experts``,
    ``eval_capacity_factor``, ...) may be given directly. A different ``image_size`` resizes the
    position embedding on loading; a different ``num_classes`` leaves the head fresh.
    """
    arrays = reference_arrays(params)
    _check_no_map_head(arrays)
    layout = _layout(arrays)
    if layout.num_layers == 0:
        raise ValueError("the V-MoE checkpoint has no Encoder/encoderblock_<i> parameters")
    for name in ("embedding/kernel", POSEMB, BLOCK.format(i=0) + "SelfAttention/query/kernel"):
        if name not in arrays:
            raise ValueError(f"the V-MoE checkpoint lacks {name}")
    patch_h, patch_w, channels, hidden = arrays["embedding/kernel"].shape
    b0 = BLOCK.format(i=0)
    mlp = b0 + ("Moe/Mlp/Dense_0/kernel" if 0 in layout.moe_layers else "Mlp/Dense_0/kernel")
    if mlp not in arrays:
        raise ValueError(f"the V-MoE checkpoint lacks {mlp}")
    moe_fields: dict[str, Any] = dict(layers=layout.moe_layers)
    if layout.num_experts is not None:
        moe_fields["num_experts"] = layout.num_experts
    moe = overrides.pop("moe", None)
    if isinstance(moe, MoeConfig):
        moe = dataclasses.asdict(moe)
    moe_fields.update(moe or {})
    moe_fields.update({k: overrides.pop(k) for k in list(overrides) if k in _MOE_FIELDS})
    if "num_experts" in moe_fields and "num_selected_experts" not in moe_fields:
        moe_fields["num_selected_experts"] = min(2, moe_fields["num_experts"])  # the paper's K
    num_classes = overrides.get("num_classes")
    if num_classes is None:
        if "head/kernel" not in arrays:
            raise ValueError("the V-MoE checkpoint has no head; pass num_classes=...")
        num_classes = int(arrays["head/kernel"].shape[-1])
    num_prefix = int("cls" in arrays)
    tokens = int(arrays[POSEMB].shape[1]) - num_prefix
    side = math.isqrt(tokens)
    if "image_size" not in overrides and side * side != tokens:
        raise ValueError(
            f"the V-MoE checkpoint's {tokens} position embeddings are not a square grid; "
            "pass image_size=..."
        )
    fields: dict[str, Any] = dict(
        num_classes=num_classes,
        image_size=(side * int(patch_h), side * int(patch_w)),
        num_channels=int(channels),
        patch_size=(int(patch_h), int(patch_w)),
        hidden_size=int(hidden),
        num_layers=layout.num_layers,
        num_heads=int(arrays[b0 + "SelfAttention/query/kernel"].shape[1]),
        mlp_dim=int(arrays[mlp].shape[-1]),
        classifier="token" if num_prefix else "gap",
        representation_size=(
            int(arrays["pre_logits/kernel"].shape[-1]) if "pre_logits/kernel" in arrays else None
        ),
        head_bias_init=-math.log(num_classes),
        moe=MoeConfig(**moe_fields),
    )
    fields.update(overrides)
    return VMoEConfig(**fields)


def _check_layout(arrays: Mapping[str, Any], config: VMoEConfig) -> None:
    layout = _layout(arrays)
    want = (layout.num_layers, layout.moe_layers)
    have = (config.num_layers, tuple(sorted(config.moe.layers)))
    if want != have:
        raise ValueError(
            f"the V-MoE checkpoint has {want[0]} blocks with MoE at {want[1]}, the model "
            f"{have[0]} with MoE at {have[1]}; build the config with config_from_vmoe_params"
        )
    if layout.num_experts is not None and layout.num_experts != config.moe.num_experts:
        raise ValueError(
            f"the V-MoE checkpoint has {layout.num_experts} experts per MoE layer, the model "
            f"{config.moe.num_experts}; build the config with config_from_vmoe_params"
        )


def load_vmoe_checkpoint(model: VMoE, checkpoint, *, reset_head: bool | None = None) -> VMoE:
    """Loads a reference checkpoint (prefix or parameters already read) into a flaxlab VMoE.

    The model's config must have the checkpoint's structure (see
    :func:`config_from_vmoe_params`); its image size and classes may differ: the position
    embedding is resized and ``reset_head`` follows
    :func:`flaxlab.models.pretrained.load_pretrained` (``None``: the checkpoint's head when its
    shape fits). Returns the model, updated in place.
    """
    if not isinstance(model, VMoE):
        raise ValueError(f"load_vmoe_checkpoint takes a VMoE, got {type(model).__name__}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_vmoe_checkpoint(checkpoint)
    arrays = reference_arrays(checkpoint)
    _check_layout(arrays, model.config)
    assign_params(model, vmoe_params_to_flaxlab(arrays, model.config), reset_head=reset_head)
    return model


def vmoe_from_checkpoint(
    checkpoint, *, rngs: nnx.Rngs | None = None, reset_head: bool | None = None, **overrides
) -> VMoE:
    """A flaxlab VMoE built from a reference checkpoint (prefix or parameters) and loaded.

    ``overrides`` go to :func:`config_from_vmoe_params` (e.g. ``num_classes=10,
    image_size=384, eval_capacity_factor=2.0``).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_vmoe_checkpoint(checkpoint)
    config = config_from_vmoe_params(checkpoint, **overrides)
    model = VMoE(config, rngs=rngs or nnx.Rngs(0))
    return load_vmoe_checkpoint(model, checkpoint, reset_head=reset_head)


__all__ = [
    "ChunkedArrayInfo",
    "VMoEIndex",
    "config_from_vmoe_params",
    "flatten_vmoe_tree",
    "load_vmoe_checkpoint",
    "read_vmoe_checkpoint",
    "read_vmoe_index",
    "reference_arrays",
    "shard_path",
    "vmoe_from_checkpoint",
    "vmoe_params_to_flaxlab",
]
