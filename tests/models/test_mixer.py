import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.models import Mixer, MixerConfig, count_parameters
from tests.reference import transformer as ref


def test_mixer_b16_parameter_count_matches_the_reference():
    model = nnx.eval_shape(
        lambda: Mixer(MixerConfig.variant("B/16", num_classes=1000), rngs=nnx.Rngs(0))
    )
    assert count_parameters(model) == 59_880_472


def test_variants():
    c = MixerConfig.variant("L/32", num_classes=3)
    assert (c.hidden_size, c.num_blocks, c.tokens_mlp_dim, c.channels_mlp_dim) == (
        1024,
        24,
        512,
        4096,
    )
    with pytest.raises(ValueError, match="unknown Mixer variant 'M/16'"):
        MixerConfig.variant("M/16")


def mixer_numpy(x, p, cfg):
    b, h, w, c = x.shape
    ph, pw = cfg.patch_size
    patches = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    t = patches.reshape(b, -1, ph * pw * c) @ p["stem"]["kernel"].reshape(ph * pw * c, -1)
    t = t + p["stem"]["bias"]
    mlp = lambda z, q: ref.dense(ref.gelu_tanh(ref.dense(z, q["fc1"])), q["fc2"])
    for i in range(cfg.num_blocks):
        q = p["blocks"][i]
        y = ref.layer_norm(t, q["norm1"]["scale"], q["norm1"]["bias"]).transpose(0, 2, 1)
        t = t + mlp(y, q["token_mixing"]).transpose(0, 2, 1)
        t = t + mlp(ref.layer_norm(t, q["norm2"]["scale"], q["norm2"]["bias"]), q["channel_mixing"])
    t = ref.layer_norm(t, p["pre_head_norm"]["scale"], p["pre_head_norm"]["bias"]).mean(1)
    return ref.dense(t, p["head"])


def test_forward_matches_numpy():
    cfg = MixerConfig(
        num_classes=4,
        image_size=(8, 8),
        num_channels=1,
        patch_size=(4, 2),
        hidden_size=12,
        num_blocks=2,
        tokens_mlp_dim=6,
        channels_mlp_dim=20,
    )
    model = Mixer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.3), state))
    x = rng.uniform(-1, 1, size=(2, 8, 8, 1)).astype(np.float32)
    p = ref.to_numpy64(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(model(jnp.asarray(x)), mixer_numpy(x, p, cfg), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 8, 3\)"):
        model(jnp.zeros((2, 8, 8, 3)))
