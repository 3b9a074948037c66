"""MoE layers (MoeLayer, Router, MoeMlp, SoftMoeLayer) and expert parallelism."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn.moe import MoeLayer, MoeMlp, SoftMoeLayer, soft_moe_weights

D, H, E = 8, 12, 4


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_params(experts):
    return {k: np.asarray(v[...], np.float64) for k, v in nnx.state(experts).items()}


def np_expert(p, e, x):
    h = np_gelu_tanh(x @ p["fc1_kernel"][e] + p["fc1_bias"][e])
    return h @ p["fc2_kernel"][e] + p["fc2_bias"][e]


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


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (2, 9, D))


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


# ---------------------------------------------------------------- Soft MoE


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


# ---------------------------------------------------------------- expert parallelism

PARALLEL_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from flax import nnx
    from flaxlab.nn.moe import MoeLayer

    def run(layer, x):
        graphdef, state = nnx.split(layer)

        def loss(state, x):
            y, aux = nnx.merge(graphdef, state)(x, deterministic=False, rngs=nnx.Rngs(gating=3))
            return jnp.sum(y**2) + aux["auxiliary_loss"], (y, aux)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)

    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    Explicit, Auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    meshes = {
        "explicit8": jax.make_mesh((8,), ("expert",), axis_types=(Explicit,)),
        "auto2x4": jax.make_mesh((2, 4), ("data", "expert"), axis_types=(Auto, Auto)),
    }
    for kind in ("einsum", "indices"):
        kw = dict(num_selected_experts=2, group_size=8, capacity_factor=0.75,
                  capacity_multiple_of=1, dispatch_kind=kind)
        (_, (y0, aux0)), g0 = run(MoeLayer(16, 32, 8, rngs=nnx.Rngs(0), **kw), x)
        assert float(aux0["dropped_fraction"]) > 0
        for name, mesh in meshes.items():
            (_, (y1, aux1)), g1 = run(MoeLayer(16, 32, 8, rngs=nnx.Rngs(0), mesh=mesh, **kw), x)
            err_y = float(jnp.max(jnp.abs(y0 - y1)))
            err_aux = max(float(jnp.max(jnp.abs(aux0[k] - aux1[k]))) for k in aux0)
            err_grad = max(float(jnp.max(jnp.abs(a - b)))
                           for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
            print(name, kind, err_y, err_aux, err_grad)
            assert err_y < 1e-5 and err_aux < 1e-5 and err_grad < 1e-4, (err_y, err_aux, err_grad)
    try:
        MoeLayer(16, 32, 6, mesh=meshes["explicit8"], rngs=nnx.Rngs(0))(x)
    except ValueError as e:
        assert "multiples" in str(e), e
    else:
        raise AssertionError("6 experts on 8 devices must fail")
    print("PARALLEL OK")
    """
)


def test_expert_parallel_equals_single_device():
    result = subprocess.run(
        [sys.executable, "-c", PARALLEL_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PARALLEL OK" in result.stdout
