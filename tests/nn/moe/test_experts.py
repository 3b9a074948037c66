"""The expert MLPs: dropout inside the experts, for every dispatcher (V-MoE reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn.moe import MoeLayer, MoeMlp, expert_mlp
from flaxlab.nn.moe.experts import dropout
from tests.nn.moe.common import D, E, H, np_params
from tests.reference.moe import expert as np_expert
from tests.reference.transformer import gelu_tanh


def test_dropout_zeros_at_the_rate_and_keeps_the_expectation():
    x = jnp.ones((200, 100))
    y = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1.0 / 0.75], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.01
    assert abs(y.mean() - 1.0) < 0.02
    np.testing.assert_array_equal(dropout(x, 0.25, None), x)  # no key: identity
    with pytest.raises(ValueError, match="rate 1.0"):
        dropout(x, 1.0, jax.random.key(0))


def test_expert_mlp_dropout_matches_numpy_with_the_same_masks():
    mlp = MoeMlp(E, D, H, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (E, 5, D))
    key = jax.random.key(7)
    got = expert_mlp(mlp.param_dict(), x, dropout_rate=0.5, dropout_key=key)
    # The masks expert_mlp draws: after the GELU, then on the output.
    k1, k2 = jax.random.split(key)
    keep1 = np.asarray(jax.random.bernoulli(k1, 0.5, (E, 5, H)))
    keep2 = np.asarray(jax.random.bernoulli(k2, 0.5, (E, 5, D)))
    p = np_params(mlp)
    xs = np.asarray(x, np.float64)
    want = np.zeros((E, 5, D))
    for e in range(E):
        h = gelu_tanh(xs[e] @ p["fc1_kernel"][e] + p["fc1_bias"][e]) * keep1[e] / 0.5
        want[e] = (h @ p["fc2_kernel"][e] + p["fc2_bias"][e]) * keep2[e] / 0.5
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    without = expert_mlp(mlp.param_dict(), x)
    np.testing.assert_allclose(
        without, np.stack([np_expert(p, e, xs[e]) for e in range(E)]), atol=1e-5
    )


@pytest.mark.parametrize("kind", ["einsum", "indices", "ragged"])
def test_layer_dropout_depends_on_the_key_in_training_only(x, kind):
    common = dict(num_selected_experts=2, group_size=6, capacity_factor=2.0, dispatch_kind=kind)
    layer = MoeLayer(D, H, E, dropout_rate=0.3, noise_std=0.0, rngs=nnx.Rngs(0), **common)
    plain = MoeLayer(D, H, E, noise_std=0.0, rngs=nnx.Rngs(0), **common)
    a, _ = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b, _ = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=2))
    again, _ = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert float(jnp.abs(a - b).max()) > 1e-2  # another key, other masks
    np.testing.assert_array_equal(a, again)
    evaluated, _ = layer(x, deterministic=True, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_allclose(evaluated, plain(x)[0], atol=1e-6)  # no dropout at evaluation
    with pytest.raises(ValueError, match="dropout"):
        layer(x, deterministic=False)
