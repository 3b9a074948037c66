"""Loading checkpoints in the released .npz layout, written independently here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from flaxlab.models import Mixer, MixerConfig, ViT, ViTConfig
from flaxlab.models.pretrained import save_pretrained
from flaxlab.models.vit import load_pretrained, resize_posemb
from tests.models.vit.test_resnet import reference_arrays as resnet_reference_arrays
from tests.reference.vit import forward_npz

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
        "Transformer/posembed_input/pos_embedding": p["posemb"],
        "head/kernel": p["head"]["kernel"],
        "head/bias": p["head"]["bias"],
    }
    if "cls" in p:
        out["cls"] = p["cls"]
    if "pre_logits" in p:
        out["pre_logits/kernel"] = p["pre_logits"]["kernel"]
        out["pre_logits/bias"] = p["pre_logits"]["bias"]
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


# ----------------------------------------------------------------------------- from_pretrained


def published(classifier="token", representation=5, seed=1, image=(8, 8)):
    config = ViTConfig(
        num_classes=4,
        image_size=image,
        classifier=classifier,
        **{**VIT, "representation_size": representation},
    )
    return to_reference_npz(random_model(ViT(config, rngs=nnx.Rngs(0)), seed))


def big_vision_names(arrays):
    """The newer generation: renamed block modules, a top-level pos_embedding without the
    class token's entry (which the returned published arrays then hold as zeros)."""
    renames = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    out = {}
    for key, value in arrays.items():
        parts = key.split("/")
        if key.startswith("Transformer/encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
        out["params/" + "/".join(parts)] = value
    posemb = out.pop("params/Transformer/posembed_input/pos_embedding")
    out["params/pos_embedding"] = posemb[:, 1:] if "cls" in arrays else posemb
    zero_slot = dict(arrays)
    if "cls" in arrays:
        zero_slot["Transformer/posembed_input/pos_embedding"] = np.concatenate(
            [np.zeros_like(posemb[:, :1]), posemb[:, 1:]], axis=1
        )
    return out, zero_slot


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("classifier, representation", [("token", 5), ("gap", None)])
@pytest.mark.parametrize("generation", ["published", "big_vision"])
def test_from_pretrained_builds_the_model_the_checkpoint_describes(
    tmp_path, classifier, representation, generation
):
    arrays = published(classifier, representation)
    expected = arrays
    if generation == "big_vision":
        arrays, expected = big_vision_names(arrays)
    np.savez(tmp_path / "ckpt.npz", **arrays)
    model = ViT.from_pretrained(tmp_path / "ckpt.npz")
    c = model.config
    assert (c.patch_size, c.hidden_size, c.num_layers, c.num_heads, c.mlp_dim) == (
        (4, 4),
        12,
        2,
        3,
        8,
    )
    assert c.classifier == classifier and c.representation_size == representation
    assert c.image_size == (8, 8) and c.num_classes == 4
    x = images((2, 8, 8, 3))
    np.testing.assert_allclose(
        model(jnp.asarray(x)), forward_npz(expected, x), rtol=1e-4, atol=1e-5
    )


def test_from_pretrained_at_a_higher_resolution_with_a_new_head(tmp_path):
    arrays = published()
    np.savez(tmp_path / "ckpt.npz", **arrays)
    model = ViT.from_pretrained(tmp_path / "ckpt.npz", image_size=16, num_classes=9)
    assert model.config.image_size == (16, 16) and model.config.num_classes == 9
    np.testing.assert_array_equal(model.head.kernel[...], 0.0)  # replaced, zero-initialised
    old = arrays["Transformer/posembed_input/pos_embedding"]
    grid = scipy.ndimage.zoom(old[0, 1:].reshape(2, 2, 12), (2, 2, 1), order=1)
    want = np.concatenate([old[:, :1], grid.reshape(1, 16, 12)], axis=1)
    np.testing.assert_allclose(model.posemb[...], want, rtol=1e-6)
    with pytest.raises(ValueError, match="MAP head"):
        ViT.from_pretrained({**arrays, "MAPHead_0/probe": np.zeros((1, 1, 12))})


def hybrid_arrays():
    """A small R+ViT: a (1, 1)-stage stem of width 32, 1x1 patches, 32x32 images (4x4 grid)."""
    stem = resnet_reference_arrays((1, 1), 32, 3, seed=5)
    stem.pop("embedding/kernel")
    rng = np.random.default_rng(6)
    vit = published(image=(4, 4), seed=7)
    vit["embedding/kernel"] = rng.normal(size=(1, 1, 256, 12)).astype(np.float32) * 0.1
    grid = vit["Transformer/posembed_input/pos_embedding"]
    vit["Transformer/posembed_input/pos_embedding"] = rng.normal(size=(1, 17, 12)).astype(
        np.float32
    )
    assert grid.shape == (1, 2, 12)  # the ViT part was built for a 1x1 grid of 4x4 patches
    return {**stem, **vit}


def test_hybrid_checkpoint_loads_and_matches_numpy(tmp_path):
    arrays = hybrid_arrays()
    model = ViT.from_pretrained(arrays)
    c = model.config
    assert c.resnet_layers == (1, 1) and c.resnet_width == 0.5 and c.patch_size == (1, 1)
    assert c.image_size == (32, 32) and c.grid_size == (4, 4)
    x = images((2, 32, 32, 3), seed=3)
    np.testing.assert_allclose(model(jnp.asarray(x)), forward_npz(arrays, x), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("build", ["vit", "hybrid", "mixer"])
def test_save_pretrained_round_trip_is_exact(tmp_path, build):
    if build == "vit":
        model = ViT.from_pretrained(published())
    elif build == "hybrid":
        model = ViT.from_pretrained(hybrid_arrays())
    else:
        config = MixerConfig(
            num_classes=3,
            image_size=(8, 8),
            patch_size=(4, 4),
            hidden_size=6,
            num_blocks=2,
            tokens_mlp_dim=5,
            channels_mlp_dim=7,
        )
        model = random_model(Mixer(config, rngs=nnx.Rngs(0)), 4)
    path = save_pretrained(model, tmp_path / "out.npz")
    again = type(model).from_pretrained(path)
    assert again.config == model.config
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(again, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))
    size = model.config.image_size
    x = jnp.asarray(images((2, *size, 3)))
    np.testing.assert_array_equal(model(x), again(x))
    with pytest.raises(ValueError, match="writes an .npz file"):
        save_pretrained(model, tmp_path / "out.msgpack")
