"""Reusable layers and the math under them."""

from flaxlab.nn.attention import (
    ATTENTION_KINDS,
    AttentionConfig,
    MultiHeadAttention,
    SoftmaxKernel,
    make_attention_kernel,
    register_attention_kernel,
)
from flaxlab.nn.moe import (
    MoeLayer,
    MoeMlp,
    Router,
    SoftMoeLayer,
    expert_parallel_moe_mlp,
    experts_choice_routing,
    moe_mlp,
    soft_moe,
    top_k_routing,
)
from flaxlab.nn.transformer import Encoder, EncoderBlock, MlpBlock, drop_path, gelu

__all__ = [
    "ATTENTION_KINDS",
    "AttentionConfig",
    "Encoder",
    "EncoderBlock",
    "MlpBlock",
    "MoeLayer",
    "MoeMlp",
    "MultiHeadAttention",
    "Router",
    "SoftMoeLayer",
    "SoftmaxKernel",
    "drop_path",
    "expert_parallel_moe_mlp",
    "experts_choice_routing",
    "gelu",
    "make_attention_kernel",
    "moe_mlp",
    "register_attention_kernel",
    "soft_moe",
    "top_k_routing",
]
