"""Float64 NumPy twins of the mixture-of-experts pieces."""

from tests.reference.transformer import gelu_tanh


def expert(params, e, x):
    """Expert ``e``'s MLP: ``gelu_tanh(x W1_e + b1_e) W2_e + b2_e`` (no dropout)."""
    h = gelu_tanh(x @ params["fc1_kernel"][e] + params["fc1_bias"][e])
    return h @ params["fc2_kernel"][e] + params["fc2_bias"][e]
