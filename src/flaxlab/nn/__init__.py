"""Reusable layers and the maths under them: attention, transformer blocks, FAVOR+, MoE."""

from flaxlab.nn import favor, moe
from flaxlab.nn.attention import (
    ATTENTION_KINDS,
    AttentionConfig,
    MultiHeadAttention,
    SoftmaxKernel,
    make_attention_kernel,
    register_attention_kernel,
)
from flaxlab.nn.layers_scan import REMAT_POLICIES, run_blocks
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
from flaxlab.nn.transformer import (
    LAYERNORM_EPSILON,
    Encoder,
    EncoderBlock,
    MlpBlock,
    drop_path,
    gelu,
)

__all__ = [
    "ATTENTION_KINDS",
    "LAYERNORM_EPSILON",
    "AttentionConfig",
    "Encoder",
    "EncoderBlock",
    "MlpBlock",
    "MoeLayer",
    "MoeMlp",
    "MultiHeadAttention",
    "REMAT_POLICIES",
    "Router",
    "SoftMoeLayer",
    "SoftmaxKernel",
    "drop_path",
    "expert_parallel_moe_mlp",
    "experts_choice_routing",
    "favor",
    "gelu",
    "make_attention_kernel",
    "moe",
    "moe_mlp",
    "register_attention_kernel",
    "run_blocks",
    "soft_moe",
    "top_k_routing",
]
