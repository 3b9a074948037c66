"""V-MoE model: layouts, upcycling, evaluation-time routing, training through the estimator."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.models.vit import ViT, ViTConfig
from flaxlab.models.vmoe import MoeConfig, VMoE, VMoEConfig, moe_layer_indices, upcycle

TINY = dict(
    num_classes=10,
    image_size=(8, 8),
    num_channels=1,
    patch_size=(2, 2),
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    mlp_dim=32,
)


@functools.cache
def _jitted(settings):
    def call(model, images):
        kw = dict(settings)
        seed = kw.pop("seed", None)
        rngs = None if seed is None else nnx.Rngs(seed)
        return model(images, deterministic=seed is None, rngs=rngs, **kw)

    return nnx.jit(call)


def run(model, images, **settings):
    """``model(images, **settings)`` through a cached nnx.jit (``seed=`` trains with noise)."""
    return _jitted(tuple(sorted(settings.items())))(model, images)


def tiny_config(**moe):
    settings = dict(layers=(1,), num_experts=4, num_selected_experts=2, group_images=4)
    settings.update(moe)
    return VMoEConfig(**TINY, moe=MoeConfig(**settings))


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(0), (8, 8, 8, 1))


@pytest.fixture(scope="module")
def model():
    return VMoE(tiny_config(capacity_factor=1.0, capacity_multiple_of=1), rngs=nnx.Rngs(0))


def test_moe_layer_placement_follows_the_reference():
    # 'Every n': n-1, 2n-1, ...; 'Last n': the last n odd-numbered blocks.
    assert moe_layer_indices("every2", 12) == (1, 3, 5, 7, 9, 11)
    assert moe_layer_indices("every4", 24) == (3, 7, 11, 15, 19, 23)
    assert moe_layer_indices("last2", 8) == (5, 7)
    assert moe_layer_indices("Last5", 12) == (3, 5, 7, 9, 11)
    with pytest.raises(ValueError, match="every<n>"):
        moe_layer_indices("first2", 8)


def test_reference_variants():
    s32 = VMoEConfig.variant("S/32", num_classes=1000)
    assert (s32.hidden_size, s32.num_layers, s32.num_heads, s32.mlp_dim) == (512, 8, 8, 2048)
    assert s32.moe.layers == (5, 7) and s32.patch_size == (32, 32)
    assert s32.representation_size == 512
    np.testing.assert_allclose(s32.head_bias_init, -math.log(1000))
    b16 = VMoEConfig.variant("B/16", moe_layers="every2", num_experts=32, num_classes=10)
    assert b16.moe.layers == (1, 3, 5, 7, 9, 11) and b16.moe.num_experts == 32
    m = b16.moe
    assert (m.capacity_factor, m.importance_loss_weight, m.load_loss_weight) == (1.05, 0.005, 0.005)
    assert m.noise_std == 1.0 and m.share_expert_init and not m.batch_priority
    with pytest.raises(ValueError, match="V-MoE variant"):
        VMoEConfig.variant("Q/16")
    with pytest.raises(ValueError, match=r"moe.layers \[5\]"):
        VMoEConfig(**TINY, moe=MoeConfig(layers=(5,)))
    with pytest.raises(ValueError, match="dispatch_kind"):
        MoeConfig(dispatch_kind="dense")


def test_config_round_trips_through_json():
    from flaxlab.train.config import dataclass_from_dict, to_dict

    config = tiny_config(eval_capacity_factor=2.0)
    data = json.loads(json.dumps(to_dict(config)))
    assert dataclass_from_dict(VMoEConfig, data) == config


def test_forward_shapes_aux_and_head_bias(model, images):
    logits, aux = run(model, images)
    assert logits.shape == (8, 10) and logits.dtype == jnp.float32
    assert set(aux) == {
        "aux_loss",
        "moe1_dropped_fraction",
        "moe1_router_entropy",
        "moe1_max_load",
        "moe1_expert_load",
    }
    load = np.asarray(aux["moe1_expert_load"])
    assert load.shape == (model.config.moe.num_experts,)
    np.testing.assert_allclose(load.max() * load.size, aux["moe1_max_load"], rtol=1e-6)
    layer = model.moe_layers()[0]
    # Experts share their initialisation (the reference's split_rngs=False).
    kernel = np.asarray(layer.experts.fc1_kernel[...])
    np.testing.assert_array_equal(kernel[0], kernel[3])
    biased = VMoE(dataclasses.replace(tiny_config(), head_bias_init=-2.0), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(biased.head.bias[...]), -2.0)


def test_training_mode_draws_noise_and_adds_load_loss(model, images):
    _, clean = run(model, images)
    _, noisy = run(model, images, seed=1)
    # Deterministic: 0.005 * importance; training: + 0.005 * load.
    assert float(noisy["aux_loss"]) != float(clean["aux_loss"])
    grads = nnx.grad(lambda m: m(images, deterministic=False, rngs=nnx.Rngs(1))[1]["aux_loss"])(
        model
    )
    router_grad = grads["encoder"]["blocks"][1]["mlp"]["router"]["kernel"][...]
    assert float(jnp.abs(router_grad).sum()) > 0


def test_evaluation_time_routing_changes(model, images):
    _, base = run(model, images)
    assert float(base["moe1_dropped_fraction"]) > 0
    roomy_logits, roomy = run(model, images, capacity_factor=4.0)
    assert float(roomy["moe1_dropped_fraction"]) == 0.0
    _, top1 = run(model, images, num_selected_experts=1, capacity_factor=4.0, batch_priority=True)
    assert float(top1["moe1_dropped_fraction"]) == 0.0
    eval_roomy = VMoE(
        tiny_config(capacity_factor=1.0, capacity_multiple_of=1, eval_capacity_factor=4.0),
        rngs=nnx.Rngs(0),
    )
    assert float(run(eval_roomy, images)[1]["moe1_dropped_fraction"]) == 0.0
    model.set_routing(capacity_factor=4.0)
    try:
        logits, aux = run(model, images)
        np.testing.assert_array_equal(logits, roomy_logits)
        assert float(aux["moe1_dropped_fraction"]) == 0.0
    finally:
        model.set_routing(capacity_factor=1.0)
    with pytest.raises(ValueError, match="routing setting"):
        model.set_routing(noise_std=0.0)


def test_upcycled_model_with_all_experts_equals_the_dense_vit(images):
    dense = ViT(ViTConfig(**TINY), rngs=nnx.Rngs(5))
    # Give the dense model non-trivial weights everywhere (the head starts at zero).
    state = nnx.state(dense, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    nnx.update(
        dense,
        jax.tree.unflatten(
            treedef, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
        ),
    )
    moe = upcycle(dense, VMoE(tiny_config(share_expert_init=False), rngs=nnx.Rngs(7)))
    kernel = moe.moe_layers()[0].experts.fc1_kernel[...]
    np.testing.assert_array_equal(kernel[2], dense.encoder.blocks[1].mlp.fc1.kernel[...])
    # With all 4 experts selected and no drops, sum_e gate_e * mlp(x) = mlp(x).
    logits, aux = run(moe, images, num_selected_experts=4, capacity_factor=4.0)
    assert float(aux["moe1_dropped_fraction"]) == 0.0
    np.testing.assert_allclose(logits, dense(images), atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        upcycle(
            ViT(dataclasses.replace(ViTConfig(**TINY), mlp_dim=8), rngs=nnx.Rngs(0)),
            VMoE(tiny_config(), rngs=nnx.Rngs(0)),
        )


@pytest.mark.parametrize("moe_rate", [None, 0.4])
def test_expert_mlps_apply_dropout_while_training(images, moe_rate):
    """As the reference: the experts drop out at the model's dropout_rate, or moe.dropout_rate
    when set; only in training mode (the dense block's dropout is off here: moe_rate alone)."""
    config = dataclasses.replace(tiny_config(dropout_rate=moe_rate), dropout_rate=0.3)
    if moe_rate is not None:
        config = dataclasses.replace(config, dropout_rate=0.0)
    model = VMoE(config, rngs=nnx.Rngs(0))
    assert model.moe_layers()[0].dropout_rate == (0.3 if moe_rate is None else moe_rate)
    head = model.head.kernel
    head[...] = jax.random.normal(jax.random.key(3), head[...].shape)  # zero-initialised
    noise_free = dict(capacity_factor=4.0)
    a, _ = run(model, images, seed=1, **noise_free)
    b, _ = run(model, images, seed=2, **noise_free)
    assert float(jnp.abs(a - b).max()) > 1e-3
    e1, _ = run(model, images, **noise_free)
    e2, _ = run(model, images, **noise_free)
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(ValueError, match=r"moe.dropout_rate=1.5"):
        tiny_config(dropout_rate=1.5)
