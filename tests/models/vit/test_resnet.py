"""The hybrid ViT's ResNet stem against an independent float64 NumPy forward pass written here
from the reference's definition (google-research/vision_transformer, models_resnet.py and the
root in models_vit.py), keyed by the released flat .npz names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.models.vit.resnet import (
    ResNetStem,
    resnet_downsampling,
    resnet_layout_from_npz,
    resnet_out_channels,
    resnet_params_from_npz,
    resnet_params_to_npz,
    standardize_kernel,
)
from tests.reference.resnet import np_stem

NUM_LAYERS = (2, 2)
WIDTH_FACTOR = 0.5  # 32 root features: the smallest width 32 GroupNorm groups allow
IN_CHANNELS = 3


def reference_arrays(num_layers, width, in_channels, seed):
    """Random parameters in the released flat layout; every other GroupNorm stored the old
    way, as (1, 1, 1, C)."""
    rng = np.random.default_rng(seed)
    out = {}
    count = [0]

    def conv(key, k, cin, cout):
        out[f"{key}/kernel"] = rng.normal(size=(k, k, cin, cout)).astype(np.float32)

    def gn(key, c):
        shape = (1, 1, 1, c) if count[0] % 2 else (c,)
        count[0] += 1
        out[f"{key}/scale"] = (1 + 0.3 * rng.normal(size=shape)).astype(np.float32)
        out[f"{key}/bias"] = (0.3 * rng.normal(size=shape)).astype(np.float32)

    conv("conv_root", 7, in_channels, width)
    gn("gn_root", width)
    cin = width
    for i, units in enumerate(num_layers, 1):
        f = width * 2 ** (i - 1)
        for j in range(1, units + 1):
            u = f"block{i}/unit{j}/"
            if cin != 4 * f or (i > 1 and j == 1):
                conv(u + "conv_proj", 1, cin, 4 * f)
                gn(u + "gn_proj", 4 * f)
            conv(u + "conv1", 1, cin, f)
            gn(u + "gn1", f)
            conv(u + "conv2", 3, f, f)
            gn(u + "gn2", f)
            conv(u + "conv3", 1, f, 4 * f)
            gn(u + "gn3", 4 * f)
            cin = 4 * f
    # Keys of the rest of a hybrid checkpoint are ignored by the stem's mapping.
    out["embedding/kernel"] = np.zeros((1, 1, cin, 8), np.float32)
    return out


# --- shared model and jitted forward ---------------------------------------------------------


@pytest.fixture(scope="module")
def arrays():
    return reference_arrays(NUM_LAYERS, 32, IN_CHANNELS, seed=0)


@pytest.fixture(scope="module")
def loaded(arrays):
    # Built abstractly (no initialisation compiled); every parameter comes from the arrays.
    model = nnx.eval_shape(
        lambda: ResNetStem(NUM_LAYERS, WIDTH_FACTOR, IN_CHANNELS, rngs=nnx.Rngs(0))
    )
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, resnet_params_from_npz(arrays))
    nnx.update(model, state)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return model, state, forward


@pytest.mark.parametrize("shape", [(2, 32, 24, 3), (1, 17, 19, 3)])
def test_forward_matches_numpy_reference(arrays, loaded, shape):
    # 32x24: asymmetric SAME pads at every strided layer; 17x19: odd sizes, mostly symmetric.
    _, state, forward = loaded
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    got = np.asarray(forward(state, jnp.asarray(x)))
    want = np_stem(arrays, x.astype(np.float64), NUM_LAYERS)
    assert got.shape == want.shape == (shape[0], -(-shape[1] // 8), -(-shape[2] // 8), 256)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_tree_matches_reference_names(arrays, loaded):
    model, _, _ = loaded
    ours = resnet_params_to_npz(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    theirs = {k for k in arrays if not k.startswith("embedding/")}
    assert set(ours) == theirs
    for k, v in ours.items():
        np.testing.assert_array_equal(v, arrays[k].reshape(v.shape))


def test_npz_round_trip(arrays):
    params = resnet_params_from_npz(arrays)
    for prefix in ("", "resnet/"):
        flat = resnet_params_to_npz(params, prefix=prefix)
        assert set(flat) == {prefix + k for k in arrays if not k.startswith("embedding/")}
        for k, v in flat.items():
            src = arrays[k[len(prefix) :]]
            if "/gn" in "/" + k:
                assert v.shape == (src.shape[-1],)  # (1, 1, 1, C) written back as (C,)
            np.testing.assert_array_equal(v, src.reshape(v.shape))
        again = resnet_params_from_npz(flat, prefix=prefix)
        assert jax.tree.structure(again) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    assert resnet_layout_from_npz(arrays) == (NUM_LAYERS, WIDTH_FACTOR)


def test_npz_errors(arrays):
    with pytest.raises(ValueError, match="conv_root"):
        resnet_params_from_npz({"embedding/kernel": np.zeros((1, 1, 3, 8))})
    bad = dict(arrays)
    bad["gn_root/scale"] = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match="GroupNorm"):
        resnet_params_from_npz(bad)


def test_weight_standardisation_epsilon():
    # A kernel with std 1e-5 tells (w - m) / (std + eps) from (w - m) / sqrt(var + eps).
    w = np.random.default_rng(2).normal(size=(3, 3, 4, 5)) * 1e-5
    want = (w - w.mean(axis=(0, 1, 2))) / (w.std(axis=(0, 1, 2)) + 1e-5)
    got = np.asarray(standardize_kernel(jnp.asarray(w, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert np.abs(got).max() < 5  # the other placement would give ~1e-2


# (num_layers, width_factor): downsampling, out channels, parameter count. The counts are the
# reference's whole-model sizes (vit_jax/models_test.py, 1000 classes, 224x224) minus the
# transformer part: R50+ViT-B/16 98,659,112 - 86,764,264; R26+ViT-S/32 36,431,912 - 22,485,736;
# R50+ViT-L/32 328,994,856 - 305,486,824; R+ViT-Ti/16 6,337,704 - 6,328,168.
STEMS = [
    ((3, 4, 9), 1, 16, 1024, 11_894_848),
    ((2, 2, 2, 2), 1, 32, 2048, 13_946_176),
    ((3, 4, 6, 3), 1, 32, 2048, 23_508_032),
    ((), 1, 4, 64, 9_536),
]


@pytest.mark.parametrize("num_layers,width_factor,down,channels,count", STEMS)
def test_shapes_and_parameter_counts(num_layers, width_factor, down, channels, count):
    model = nnx.eval_shape(lambda: ResNetStem(num_layers, width_factor, 3, rngs=nnx.Rngs(0)))
    assert model.downsampling == resnet_downsampling(num_layers) == down
    assert model.out_channels == resnet_out_channels(num_layers, width_factor) == channels
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert out.shape == (2, 224 // down, 224 // down, channels)


def test_initialisation_and_dtype():
    model = ResNetStem((1,), 0.5, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    unit = model.block1.unit1  # pyright: ignore[reportAttributeAccessIssue] (set by setattr)
    assert not np.any(unit.gn3.scale[...])  # zero-initialised last norm, as the reference
    assert np.all(unit.gn2.scale[...] == 1) and model.conv_root.kernel[...].dtype == jnp.float32
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 2, 128)
    with pytest.raises(ValueError, match="GroupNorm groups"):
        ResNetStem((1,), 0.25, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        model(jnp.ones((1, 8, 8, 1)))
