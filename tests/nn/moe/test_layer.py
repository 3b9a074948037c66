"""The MoE layer (MoeLayer, Router, MoeMlp) vs a float64 NumPy V-MoE block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn.moe import MoeLayer, MoeMlp
from tests.nn.moe.common import D, E, H, np_params
from tests.reference.moe import expert as np_expert
from tests.reference.transformer import softmax as np_softmax


def np_moe_layer(layer, x, group_size, k, capacity):
    """Float64 V-MoE block: groups, softmax router, greedy top-k queues, weighted experts."""
    p = np_params(layer.experts)
    kernel = np.asarray(layer.router.kernel[...], np.float64)
    groups = np.asarray(x, np.float64).reshape(-1, group_size, x.shape[-1])
    y = np.zeros(groups.shape[:2] + (p["fc2_bias"].shape[-1],))
    for g, tokens in enumerate(groups):
        gates = np_softmax(tokens @ kernel)
        choices = np.argsort(-gates, -1, kind="stable")[:, :k]
        filled = np.zeros(gates.shape[-1], int)
        for j in range(k):
            for s in range(group_size):
                e = choices[s, j]
                if filled[e] < capacity:
                    y[g, s] += gates[s, e] * np_expert(p, e, tokens[s])
                filled[e] += 1
    return y.reshape(*x.shape[:2], -1)


@pytest.fixture(scope="module")
def layer():
    return MoeLayer(
        D,
        H,
        E,
        num_selected_experts=2,
        group_size=6,
        capacity_factor=1.0,
        capacity_multiple_of=1,
        rngs=nnx.Rngs(0),
    )


def test_moe_layer_matches_numpy(layer, x):
    y, aux = layer(x)  # capacity ceil(6 * 2 / 4) = 3
    np.testing.assert_allclose(np.asarray(y), np_moe_layer(layer, x, 6, 2, 3), atol=2e-5)
    assert set(aux) == {
        "auxiliary_loss",
        "importance_loss",
        "gshard_loss",
        "expert_load",
        "dropped_fraction",
        "router_entropy",
    }
    assert aux["expert_load"].shape == (E,)
    np.testing.assert_allclose(float(aux["expert_load"].sum()), 1.0, rtol=1e-6)
    # Deterministic: auxiliary loss = importance loss (weights 1, 1, 0; no load loss).
    np.testing.assert_allclose(aux["auxiliary_loss"], aux["importance_loss"], rtol=1e-6)


def test_evaluation_time_overrides(layer, x):
    y1, aux1 = layer(x, num_selected_experts=1, capacity_factor=4.0, batch_priority=True)
    np.testing.assert_allclose(np.asarray(y1), np_moe_layer(layer, x, 6, 1, 6), atol=2e-5)
    assert float(aux1["dropped_fraction"]) == 0.0
    _, tight = layer(x, capacity_factor=0.5)
    assert float(tight["dropped_fraction"]) > 0.0
    # Per-call overrides leave the attributes alone; attributes change the default.
    assert layer.router.capacity_factor == 1.0
    layer.router.capacity_factor = 0.5
    try:
        np.testing.assert_allclose(layer(x)[1]["dropped_fraction"], tight["dropped_fraction"])
    finally:
        layer.router.capacity_factor = 1.0


def test_dispatch_kinds_agree_in_layer(layer, x):
    outs = [
        layer(x, capacity_factor=3.0, dispatch_kind=k)[0] for k in ("einsum", "indices", "ragged")
    ]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    ragged_aux = layer(x, dispatch_kind="ragged", capacity_factor=0.5)[1]
    assert float(ragged_aux["dropped_fraction"]) == 0.0


def test_noise_needs_rngs_and_adds_load_loss(layer, x):
    with pytest.raises(ValueError, match="rngs"):
        layer(x, deterministic=False)
    y_a, aux = layer(x, deterministic=False, rngs=nnx.Rngs(gating=3))
    y_b, _ = layer(x, deterministic=False, rngs=nnx.Rngs(gating=3))
    np.testing.assert_array_equal(y_a, y_b)
    np.testing.assert_allclose(
        aux["auxiliary_loss"], aux["importance_loss"] + aux["load_loss"], rtol=1e-5
    )


def test_layer_validation(layer):
    with pytest.raises(ValueError, match="group_size=6"):
        layer(jnp.ones((1, 5, D)))
    with pytest.raises(ValueError, match="dispatch_kind='gather'"):
        MoeLayer(D, H, E, dispatch_kind="gather", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="routing_kind='soft'"):
        MoeLayer(D, H, E, routing_kind="soft", rngs=nnx.Rngs(0))


def test_experts_choice_layer(x):
    layer = MoeLayer(D, H, E, routing_kind="experts_choice", group_size=9, rngs=nnx.Rngs(2))
    y, aux = layer(x)
    assert y.shape == x.shape and float(aux["auxiliary_loss"]) == 0.0
    y_einsum, _ = layer(x, dispatch_kind="einsum")
    np.testing.assert_allclose(y, y_einsum, atol=1e-5)


def test_parameter_names_shapes_and_axes(layer):
    state = nnx.state(layer, nnx.Param)
    shapes = {"/".join(map(str, p)): v[...].shape for p, v in nnx.to_flat_state(state)}
    assert shapes == {
        "router/kernel": (D, E),
        "experts/fc1_kernel": (E, D, H),
        "experts/fc1_bias": (E, H),
        "experts/fc2_kernel": (E, H, D),
        "experts/fc2_bias": (E, D),
    }
    specs = nnx.get_partition_spec(state)
    assert specs["experts"]["fc1_kernel"].get_value() == jax.sharding.PartitionSpec(
        "expert", "embed", "mlp"
    )
    # Experts get independent initial weights.
    kernel = np.asarray(layer.experts.fc1_kernel[...])
    assert not np.allclose(kernel[0], kernel[1])


def test_moe_mlp_module_applies_each_expert():
    mlp = MoeMlp(3, 4, 5, out_features=2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 2, 4))
    p = np_params(mlp)
    want = np.stack([np_expert(p, e, x[e]) for e in range(3)])
    np.testing.assert_allclose(mlp(jnp.asarray(x, jnp.float32)), want, atol=1e-5)
