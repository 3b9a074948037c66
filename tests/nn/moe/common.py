"""Sizes and helpers shared by the MoE layer tests (the ``x`` fixture: conftest.py)."""

import numpy as np
from flax import nnx

D, H, E = 8, 12, 4


def np_params(experts):
    """An expert module's parameters as float64 NumPy arrays by name."""
    return {k: np.asarray(v[...], np.float64) for k, v in nnx.state(experts).items()}
