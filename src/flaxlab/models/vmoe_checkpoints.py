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

import numpy as np
from flax import nnx

from flaxlab.models.pretrained import assign_params, resize_posemb
from flaxlab.models.vmoe import MoeConfig, VMoE, VMoEConfig
from flaxlab.models.vmoe_format import (  # noqa: F401 (this module's interface too)
    INDEX_VERSIONS,
    ChunkedArrayInfo,
    VMoEIndex,
    flatten_vmoe_tree,
    read_vmoe_checkpoint,
    read_vmoe_index,
    shard_path,
)

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
