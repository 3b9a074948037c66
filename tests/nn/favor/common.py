"""Sizes and the jitted attention shared by the FAVOR+ tests (fixtures: conftest.py)."""

import jax

from flaxlab.nn import favor

B, L, H, D = 2, 13, 2, 8
M = 24


attend = jax.jit(
    favor.favor_attention,
    static_argnames=(
        "kernel",
        "causal",
        "numerical_stabilizer",
        "renormalize",
        "chunk_size",
        "implementation",
    ),
)
