"""The ViT's mapping to and from the official ``.npz`` layout (google-research/vision_transformer).

Keys are ``/``-joined Linen paths: ``embedding/kernel``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_<i>/LayerNorm_0``,
``MultiHeadDotProductAttention_1/{query,key,value,out}``, ``LayerNorm_2``,
``MlpBlock_3/Dense_{0,1}``, ``Transformer/encoder_norm``, ``pre_logits``, ``head``, and for
hybrids the ResNet stem's ``conv_root``, ``gn_root``, ``block<i>/unit<j>/...``. Attention
kernels there are per head (``[D, heads, d]`` and ``[heads, d, D]``); flaxlab's are ``[D, D]``.

big_vision's newer generation names the block's modules ``LayerNorm_0``,
``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0`` and keeps the position
embedding at the top level (``pos_embedding``), without an entry for the class token, which it
concatenates after adding them; :func:`normalize_vit_names` rewrites those files to the
published layout (a zero position embedding for the class token computes the same function).
"""

from __future__ import annotations

import math
import re

import numpy as np

from flaxlab.models.pretrained import count_blocks, dense_params, norm_params
from flaxlab.models.vit.resnet import (
    resnet_downsampling,
    resnet_layout_from_npz,
    resnet_params_from_npz,
    resnet_params_to_npz,
)

VIT_BLOCK = "Transformer/encoderblock_{i}/"
POSEMB = "Transformer/posembed_input/pos_embedding"
_NEW_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK = re.compile(r"(Transformer/encoderblock_\d+/)([^/]+)(/.*)")


def normalize_vit_names(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any supported generation of ViT ``.npz`` keys rewritten to the published layout.

    Handles a leading ``params/``, big_vision's block names and its position embeddings
    (``pos_embedding`` or ``Transformer/pos_embedding``, with or without the class token's
    entry). MAP-head checkpoints are refused in one line.
    """
    arrays = {k.removeprefix("params/"): np.asarray(v) for k, v in arrays.items()}
    if any(k.startswith("MAPHead") or k == "probe" for k in arrays):
        raise ValueError(
            "this checkpoint pools with a MAP head (MAPHead_0), which flaxlab's ViT does not "
            "have; accepted: class-token or global-average-pooling ViTs"
        )
    new_generation = any("/MlpBlock_0/" in k for k in arrays)
    if new_generation:
        renamed = {}
        for key, value in arrays.items():
            match = _BLOCK.fullmatch(key)
            if match:
                module = _NEW_BLOCK_NAMES.get(match.group(2), match.group(2))
                key = match.group(1) + module + match.group(3)
            renamed[key] = value
        arrays = renamed
    for old in ("pos_embedding", "Transformer/pos_embedding"):
        if old in arrays:
            posemb = arrays.pop(old)
            tokens = posemb.shape[1]
            has_cls_slot = math.isqrt(tokens - 1) ** 2 == tokens - 1 and tokens > 1
            if "cls" in arrays and not (has_cls_slot and math.isqrt(tokens) ** 2 != tokens):
                # big_vision adds the grid's posemb before concatenating the class token.
                posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
            arrays[POSEMB] = posemb
    return arrays


def vit_params_from_npz(arrays: dict[str, np.ndarray]) -> dict:
    """The reference ViT's flat arrays as a flaxlab ViT parameter tree (nested dicts)."""
    arrays = normalize_vit_names(arrays)
    hidden = arrays["embedding/kernel"].shape[-1]
    blocks = []
    for i in range(count_blocks(arrays, r"Transformer/encoderblock_(\d+)/")):
        b = VIT_BLOCK.format(i=i) + "MultiHeadDotProductAttention_1/"
        attn = {
            name: {
                "kernel": arrays[f"{b}{name}/kernel"].reshape(hidden, hidden),
                "bias": arrays[f"{b}{name}/bias"].reshape(hidden),
            }
            for name in ("query", "key", "value")
        }
        attn["out"] = {
            "kernel": arrays[f"{b}out/kernel"].reshape(hidden, hidden),
            "bias": arrays[f"{b}out/bias"],
        }
        b = VIT_BLOCK.format(i=i)
        blocks.append(
            {
                "norm1": norm_params(arrays, f"{b}LayerNorm_0"),
                "attn": attn,
                "norm2": norm_params(arrays, f"{b}LayerNorm_2"),
                "mlp": {
                    "fc1": dense_params(arrays, f"{b}MlpBlock_3/Dense_0"),
                    "fc2": dense_params(arrays, f"{b}MlpBlock_3/Dense_1"),
                },
            }
        )
    params = {
        "embedding": dense_params(arrays, "embedding"),
        "posemb": arrays[POSEMB],
        "encoder": {
            "blocks": dict(enumerate(blocks)),
            "encoder_norm": norm_params(arrays, "Transformer/encoder_norm"),
        },
    }
    if "head/kernel" in arrays:
        params["head"] = dense_params(arrays, "head")
    if "cls" in arrays:
        params["cls"] = arrays["cls"]
    if "pre_logits/kernel" in arrays:
        params["pre_logits"] = dense_params(arrays, "pre_logits")
    if "conv_root/kernel" in arrays:
        params["stem"] = resnet_params_from_npz(arrays)
    return params


def vit_params_to_npz(params: dict, num_heads: int) -> dict[str, np.ndarray]:
    """A flaxlab ViT's parameter tree (``nnx.to_pure_dict``) in the published ``.npz`` layout:
    the inverse of :func:`vit_params_from_npz` (per-head attention kernels)."""
    p = {k: v for k, v in params.items()}
    hidden = np.shape(p["embedding"]["kernel"])[-1]
    head_dim = hidden // num_heads
    out: dict[str, np.ndarray] = {}

    def put(key, layer):
        for name, value in layer.items():
            out[f"{key}/{name}"] = np.asarray(value)

    put("embedding", p["embedding"])
    out[POSEMB] = np.asarray(p["posemb"])
    put("Transformer/encoder_norm", p["encoder"]["encoder_norm"])
    for name in ("head", "pre_logits"):
        if name in p:
            put(name, p[name])
    if "cls" in p:
        out["cls"] = np.asarray(p["cls"])
    if "stem" in p:
        out.update(resnet_params_to_npz(p["stem"]))
    for i, block in p["encoder"]["blocks"].items():
        b = VIT_BLOCK.format(i=i)
        put(f"{b}LayerNorm_0", block["norm1"])
        put(f"{b}LayerNorm_2", block["norm2"])
        put(f"{b}MlpBlock_3/Dense_0", block["mlp"]["fc1"])
        put(f"{b}MlpBlock_3/Dense_1", block["mlp"]["fc2"])
        attn = f"{b}MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            layer = block["attn"][name]
            out[f"{attn}{name}/kernel"] = np.asarray(layer["kernel"]).reshape(
                hidden, num_heads, head_dim
            )
            out[f"{attn}{name}/bias"] = np.asarray(layer["bias"]).reshape(num_heads, head_dim)
        out[f"{attn}out/kernel"] = np.asarray(block["attn"]["out"]["kernel"]).reshape(
            num_heads, head_dim, hidden
        )
        out[f"{attn}out/bias"] = np.asarray(block["attn"]["out"]["bias"])
    return out


def vit_config_fields(arrays: dict[str, np.ndarray]) -> dict:
    """The :class:`~flaxlab.models.vit.ViTConfig` fields a checkpoint's arrays imply.

    Patch size and width from the embedding kernel, depth from the blocks, heads from the
    per-head query kernel, MLP width from ``Dense_0``, class token (``cls``) or mean pooling,
    the ``pre_logits`` width, the class count from the head, the hybrid stem's layout, and the
    image size of the grid the position embedding holds.
    """
    arrays = normalize_vit_names(arrays)
    kh, kw, _, hidden = arrays["embedding/kernel"].shape
    block = VIT_BLOCK.format(i=0)
    query = arrays[f"{block}MultiHeadDotProductAttention_1/query/kernel"]
    if query.ndim != 3:
        raise ValueError(f"query kernel {query.shape}: expected per-head [D, heads, d]")
    fields: dict = dict(
        patch_size=(kh, kw),
        hidden_size=hidden,
        num_layers=count_blocks(arrays, r"Transformer/encoderblock_(\d+)/"),
        num_heads=query.shape[1],
        mlp_dim=arrays[f"{block}MlpBlock_3/Dense_0/kernel"].shape[1],
        classifier="token" if "cls" in arrays else "gap",
        representation_size=(
            arrays["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in arrays else None
        ),
    )
    if "head/kernel" in arrays:
        fields["num_classes"] = arrays["head/kernel"].shape[1]
    scale = 1
    if "conv_root/kernel" in arrays:
        layers, width = resnet_layout_from_npz(arrays)
        fields.update(resnet_layers=layers, resnet_width=width)
        fields["num_channels"] = arrays["conv_root/kernel"].shape[2]
        scale = resnet_downsampling(layers)
    else:
        fields["num_channels"] = arrays["embedding/kernel"].shape[2]
    tokens = arrays[POSEMB].shape[1] - (1 if "cls" in arrays else 0)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(
            f"the position embedding holds {tokens} grid entries, not a square grid; pass "
            "image_size"
        )
    fields["image_size"] = (side * kh * scale, side * kw * scale)
    return fields
