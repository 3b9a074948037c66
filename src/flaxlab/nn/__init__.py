"""Reusable layers and the math under them."""

from flaxlab.nn.attention import (
    ATTENTION_KINDS,
    AttentionConfig,
    MultiHeadAttention,
    SoftmaxKernel,
    make_attention_kernel,
    register_attention_kernel,
)
from flaxlab.nn.transformer import Encoder, EncoderBlock, MlpBlock, drop_path, gelu

__all__ = [
    "ATTENTION_KINDS",
    "AttentionConfig",
    "Encoder",
    "EncoderBlock",
    "MlpBlock",
    "MultiHeadAttention",
    "SoftmaxKernel",
    "drop_path",
    "gelu",
    "make_attention_kernel",
    "register_attention_kernel",
]
