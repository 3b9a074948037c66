"""The ViT's mapping from the official ``.npz`` layout (google-research/vision_transformer).

Keys are ``/``-joined Linen paths: ``embedding/kernel``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_<i>/LayerNorm_0``,
``MultiHeadDotProductAttention_1/{query,key,value,out}``, ``LayerNorm_2``,
``MlpBlock_3/Dense_{0,1}``, ``Transformer/encoder_norm``, ``pre_logits``, ``head``. Attention
kernels there are per head (``[D, heads, d]`` and ``[heads, d, D]``); flaxlab's are ``[D, D]``.
"""

from __future__ import annotations

import numpy as np

from flaxlab.models.pretrained import count_blocks, dense_params, norm_params

VIT_BLOCK = "Transformer/encoderblock_{i}/"


def vit_params_from_npz(arrays: dict[str, np.ndarray]) -> dict:
    """The reference ViT's flat arrays as a flaxlab ViT parameter tree (nested dicts)."""
    if any("conv_root" in k for k in arrays):
        raise ValueError("hybrid (ResNet + ViT) checkpoints are not supported; use a pure ViT")
    hidden = arrays["embedding/kernel"].shape[-1]
    blocks = []
    for i in range(count_blocks(arrays, r"Transformer/encoderblock_(\d+)/")):
        b = VIT_BLOCK.format(i=i)
        attn = {}
        for name in ("query", "key", "value"):
            attn[name] = {
                "kernel": arrays[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"].reshape(
                    hidden, hidden
                ),
                "bias": arrays[f"{b}MultiHeadDotProductAttention_1/{name}/bias"].reshape(hidden),
            }
        attn["out"] = {
            "kernel": arrays[f"{b}MultiHeadDotProductAttention_1/out/kernel"].reshape(
                hidden, hidden
            ),
            "bias": arrays[f"{b}MultiHeadDotProductAttention_1/out/bias"],
        }
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
        "posemb": arrays["Transformer/posembed_input/pos_embedding"],
        "encoder": {
            "blocks": dict(enumerate(blocks)),
            "encoder_norm": norm_params(arrays, "Transformer/encoder_norm"),
        },
        "head": dense_params(arrays, "head"),
    }
    if "cls" in arrays:
        params["cls"] = arrays["cls"]
    if "pre_logits/kernel" in arrays:
        params["pre_logits"] = dense_params(arrays, "pre_logits")
    return params
