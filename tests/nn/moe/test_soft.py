"""Soft MoE (SoftMoeLayer, soft_moe_weights) vs a float64 NumPy twin."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn.moe import SoftMoeLayer, soft_moe_weights
from tests.nn.moe.common import D, E, H, np_params
from tests.reference.moe import expert as np_expert
from tests.reference.transformer import softmax as np_softmax


def np_soft_moe(layer, x):
    p = np_params(layer.experts)
    mu = np.asarray(layer.mu[...], np.float64)
    scale = float(layer.scale[...])
    x = np.asarray(x, np.float64)
    xn = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
    mun = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)
    logits = scale * np.einsum("gsd,dep->gsep", xn, mun)
    dispatch = np_softmax(logits, axis=1)
    g, s, e, n = logits.shape
    combine = np_softmax(logits.reshape(g, s, e * n), axis=-1).reshape(logits.shape)
    slots = np.einsum("gsep,gsd->gepd", dispatch, x)
    out = np.stack([np_expert(p, i, slots[:, i]) for i in range(e)], axis=1)
    return np.einsum("gsep,gepd->gsd", combine, out), dispatch, combine


def test_soft_moe_matches_numpy(x):
    layer = SoftMoeLayer(D, H, num_experts=E, num_slots=2, rngs=nnx.Rngs(3))
    layer.scale[...] = jnp.asarray(2.5)
    want, want_dispatch, want_combine = np_soft_moe(layer, x)
    y, aux = layer(x)
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5)
    dispatch, combine = soft_moe_weights(x, layer.mu[...], layer.scale[...])
    np.testing.assert_allclose(dispatch, want_dispatch, atol=1e-6)
    np.testing.assert_allclose(combine, want_combine, atol=1e-6)
    assert float(aux["auxiliary_loss"]) == 0.0
    # bf16 dispatch: same result within bf16 rounding.
    layer.dispatch_dtype = jnp.bfloat16
    y16, _ = layer(x)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16), want, atol=3e-2)
    assert not np.allclose(np.asarray(y16), want, atol=1e-6)


def test_soft_moe_noise_and_grad(x):
    layer = SoftMoeLayer(D, H, num_experts=E, num_slots=1, noise_std=1.0, rngs=nnx.Rngs(4))
    with pytest.raises(ValueError, match="rngs"):
        layer(x, deterministic=False)
    noisy, _ = layer(x, deterministic=False, rngs=nnx.Rngs(gating=0))
    assert not np.allclose(noisy, layer(x)[0])
    grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
    assert float(jnp.abs(grads["scale"][...])) > 0
    assert float(jnp.abs(grads["mu"][...]).sum()) > 0
