"""Loading checkpoints in the released .npz layout, written independently here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from flaxlab.models import Mixer, MixerConfig, ViT, ViTConfig
from flaxlab.models.vit import load_pretrained, resize_posemb

VIT = dict(
    num_channels=3,
    patch_size=(4, 4),
    hidden_size=12,
    num_layers=2,
    num_heads=3,
    mlp_dim=8,
    representation_size=5,
)


def random_model(model, seed):
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape)), state))
    return model


def to_reference_npz(model: ViT) -> dict[str, np.ndarray]:
    """The vit_jax layout: per-head attention kernels, Linen module names."""
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    heads, d = model.config.num_heads, model.config.hidden_size
    out = {
        "embedding/kernel": p["embedding"]["kernel"],
        "embedding/bias": p["embedding"]["bias"],
        "cls": p["cls"],
        "Transformer/posembed_input/pos_embedding": p["posemb"],
        "head/kernel": p["head"]["kernel"],
        "head/bias": p["head"]["bias"],
        "pre_logits/kernel": p["pre_logits"]["kernel"],
        "pre_logits/bias": p["pre_logits"]["bias"],
    }
    for name in ("scale", "bias"):
        out[f"Transformer/encoder_norm/{name}"] = p["encoder"]["encoder_norm"][name]
    for i, b in p["encoder"]["blocks"].items():
        pre = f"Transformer/encoderblock_{i}/"
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            for name in ("scale", "bias"):
                out[pre + f"{theirs}/{name}"] = b[ours][name]
        att = pre + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            out[att + f"{name}/kernel"] = b["attn"][name]["kernel"].reshape(d, heads, d // heads)
            out[att + f"{name}/bias"] = b["attn"][name]["bias"].reshape(heads, d // heads)
        out[att + "out/kernel"] = b["attn"]["out"]["kernel"].reshape(heads, d // heads, d)
        out[att + "out/bias"] = b["attn"]["out"]["bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            for name in ("kernel", "bias"):
                out[pre + f"MlpBlock_3/Dense_{j}/{name}"] = b["mlp"][fc][name]
    return out


def test_vit_round_trip_through_the_reference_layout(tmp_path):
    config = ViTConfig(num_classes=4, image_size=(8, 8), **VIT)
    source = random_model(ViT(config, rngs=nnx.Rngs(0)), 1)
    np.savez(tmp_path / "vit.npz", **to_reference_npz(source))
    target = load_pretrained(ViT(config, rngs=nnx.Rngs(5)), tmp_path / "vit.npz")
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    np.testing.assert_allclose(target(x), source(x), rtol=1e-5, atol=1e-5)


def test_posemb_resizes_to_a_non_square_grid_like_scipy_zoom():
    source = random_model(
        ViT(ViTConfig(num_classes=4, image_size=(16, 16), **VIT), rngs=nnx.Rngs(0)), 2
    )
    arrays = to_reference_npz(source)
    target = load_pretrained(
        ViT(ViTConfig(num_classes=4, image_size=(8, 12), **VIT), rngs=nnx.Rngs(1)), arrays
    )
    old = arrays["Transformer/posembed_input/pos_embedding"]
    grid = scipy.ndimage.zoom(old[0, 1:].reshape(4, 4, 12), (2 / 4, 3 / 4, 1), order=1)
    want = np.concatenate([old[:, :1], grid.reshape(1, 6, 12)], axis=1)
    np.testing.assert_allclose(target.posemb[...], want, rtol=1e-6)
    assert resize_posemb(old, (4, 4)) is old


def test_head_is_kept_when_it_fits_and_reset_otherwise():
    arrays = to_reference_npz(
        random_model(ViT(ViTConfig(num_classes=4, image_size=(8, 8), **VIT), rngs=nnx.Rngs(0)), 3)
    )
    kept = load_pretrained(
        ViT(ViTConfig(num_classes=4, image_size=(8, 8), **VIT), rngs=nnx.Rngs(1)), arrays
    )
    np.testing.assert_allclose(kept.head.kernel[...], arrays["head/kernel"], rtol=1e-6)
    reset = load_pretrained(
        ViT(ViTConfig(num_classes=4, image_size=(8, 8), **VIT), rngs=nnx.Rngs(1)),
        arrays,
        reset_head=True,
    )
    np.testing.assert_array_equal(reset.head.kernel[...], 0.0)
    new_task = ViT(ViTConfig(num_classes=7, image_size=(8, 8), **VIT), rngs=nnx.Rngs(1))
    load_pretrained(new_task, arrays)
    np.testing.assert_array_equal(new_task.head.kernel[...], 0.0)
    with pytest.raises(ValueError, match=r"head has shape \(5, 4\) but the model's is \(5, 7\)"):
        load_pretrained(new_task, arrays, reset_head=False)
    wrong = ViT(
        ViTConfig(num_classes=4, image_size=(8, 8), **{**VIT, "mlp_dim": 16}), rngs=nnx.Rngs(1)
    )
    with pytest.raises(ValueError, match=r"MlpBlock_3|mlp/fc1/kernel has shape \(12, 8\)"):
        load_pretrained(wrong, arrays)


def test_mixer_round_trip():
    config = MixerConfig(
        num_classes=3,
        image_size=(8, 8),
        patch_size=(4, 4),
        hidden_size=6,
        num_blocks=2,
        tokens_mlp_dim=5,
        channels_mlp_dim=7,
    )
    source = random_model(Mixer(config, rngs=nnx.Rngs(0)), 4)
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    arrays = {
        "stem/kernel": p["stem"]["kernel"],
        "stem/bias": p["stem"]["bias"],
        "head/kernel": p["head"]["kernel"],
        "head/bias": p["head"]["bias"],
        "pre_head_layer_norm/scale": p["pre_head_norm"]["scale"],
        "pre_head_layer_norm/bias": p["pre_head_norm"]["bias"],
    }
    for i, b in p["blocks"].items():
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            for n in ("scale", "bias"):
                arrays[f"MixerBlock_{i}/{theirs}/{n}"] = b[ours][n]
        for mix in ("token_mixing", "channel_mixing"):
            for j, fc in enumerate(("fc1", "fc2")):
                for n in ("kernel", "bias"):
                    arrays[f"MixerBlock_{i}/{mix}/Dense_{j}/{n}"] = b[mix][fc][n]
    target = load_pretrained(Mixer(config, rngs=nnx.Rngs(9)), arrays)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    np.testing.assert_allclose(target(x), source(x), rtol=1e-5, atol=1e-5)
