"""Performer FAVOR+ attention (Choromanski et al. 2020): features, bidirectional, causal."""

from flaxlab.nn.favor.attention import (
    KERNELS,
    FavorCounter,
    FavorKernel,
    FavorProjection,
    FavorSeed,
    favor_attention,
)
from flaxlab.nn.favor.causal import (
    DEFAULT_CHUNK_SIZE,
    IMPLEMENTATIONS,
    FavorCausalState,
    causal_favor,
    chunked_causal_linear_attention,
    default_chunk_size,
    default_implementation,
    favor_causal_init_state,
    favor_causal_step,
    scan_chunk_size,
    stabilize_denominator,
)
from flaxlab.nn.favor.causal_scan import softmax_causal_scan
from flaxlab.nn.favor.features import (
    FEATURE_TYPES,
    draw_projection,
    gaussian_orthogonal_random_matrix,
    gaussian_random_matrix,
    relu_kernel_features,
    softmax_kernel_features,
    softmax_projection_terms,
)
from flaxlab.nn.favor.reference import reference_causal_favor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FEATURE_TYPES",
    "IMPLEMENTATIONS",
    "KERNELS",
    "FavorCausalState",
    "FavorCounter",
    "FavorKernel",
    "FavorProjection",
    "FavorSeed",
    "causal_favor",
    "chunked_causal_linear_attention",
    "default_chunk_size",
    "default_implementation",
    "reference_causal_favor",
    "draw_projection",
    "favor_attention",
    "favor_causal_init_state",
    "favor_causal_step",
    "gaussian_orthogonal_random_matrix",
    "gaussian_random_matrix",
    "relu_kernel_features",
    "scan_chunk_size",
    "softmax_causal_scan",
    "softmax_kernel_features",
    "softmax_projection_terms",
    "stabilize_denominator",
]
