"""Mixed precision is one switch on every model: ``model.dtype=bfloat16`` computes in bfloat16
with float32 parameters (and optimizer state), and matches float32 within bfloat16 tolerance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.configs import get_preset
from flaxlab.data.factory import make_data
from flaxlab.models.registry import model_class
from flaxlab.train import Estimator, sharding
from tests.train.tiny import TINY

FAMILIES = {
    "vit-digits": TINY[:4],
    "mixer-digits": [
        "model.hidden_size=16",
        "model.num_blocks=1",
        "model.tokens_mlp_dim=8",
        "model.channels_mlp_dim=16",
    ],
    "vmoe-digits": ["model.moe.layers=1", "model.num_layers=2", "model.moe.num_experts=2"]
    + TINY[:1]
    + TINY[2:4],
    "performer-lm-stdlib": [
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.mlp_dim=32",
        "model.num_layers=1",
        "model.seq_len=16",
        "model.attention.num_features=8",
        "data.seq_len=16",
    ],
    "vdm-digits": ["model.schedule=fixed", "model.width=8", "model.depth=1", "model.groups=4"],
}


def randomized(model, seed=1):
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.2), state))
    return model


def output(model, config, batch):
    if config.family == "performer_lm":
        return model(batch["tokens"][:, :-1])
    if config.family == "vdm":
        from flaxlab.models.vdm import to_pixels

        return model.loss(to_pixels(batch["image"]), None, jax.random.key(0), deterministic=True)[0]
    out = model(batch["image"])
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_bfloat16_matches_float32_with_float32_parameters(preset):
    config = get_preset(preset, FAMILIES[preset])
    bf16 = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16"))
    cls = model_class(config.family)
    full = randomized(cls(config.model, rngs=nnx.Rngs(0)))
    half = cls(bf16.model, rngs=nnx.Rngs(0))
    nnx.update(half, nnx.state(full, nnx.Param))
    for leaf in jax.tree.leaves(nnx.state(half, nnx.Param)):
        assert leaf.dtype == jnp.float32
    batch = make_data(dataclasses.replace(config.data, batch_size=8))[0](0)
    batch = jax.tree.map(jnp.asarray, batch)
    want = np.asarray(jax.jit(lambda b: output(full, config, b))(batch), np.float64)
    got = np.asarray(jax.jit(lambda b: output(half, config, b))(batch), np.float64)
    assert got.dtype == np.float64 and np.all(np.isfinite(got))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.05 * scale + 1e-3, (np.abs(got - want).max(), scale)
    assert np.abs(got - want).max() > 0  # bfloat16 really is used


def test_a_bfloat16_training_step_keeps_float32_parameters_and_optimizer_state(tmp_path):
    config = get_preset("vit-digits", TINY + ["model.dtype=bfloat16"])
    estimator = Estimator(config, tmp_path, progress=False)
    batch = sharding.shard_batch(make_data(config.data)[0](0), estimator.mesh)
    state, metrics = estimator.make_train_step()(estimator.init_state(), batch)
    assert np.isfinite(float(metrics["loss"]))
    floats = [
        x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
