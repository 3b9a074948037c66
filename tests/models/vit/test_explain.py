"""Attention rollout and Mixer token-mixing maps against float64 NumPy twins; the PNG writers;
``flaxlab explain`` end to end on tiny vit-digits and mixer-digits runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from typer.testing import CliRunner

from flaxlab.cli import app
from flaxlab.models.mixer import Mixer, MixerConfig
from flaxlab.models.vit import ViT, ViTConfig
from flaxlab.models.vit.explain import (
    attention_rollout,
    explain_image,
    mixer_token_mixing,
    rollout_matrix,
    tile_maps,
    token_mixing_maps,
    upsample,
    vit_attentions,
)
from flaxlab.models.vmoe import MoeConfig, VMoE, VMoEConfig
from tests.train.tiny import TINY

runner = CliRunner()


def random_attention(rng, layers, heads, tokens):
    """Row-stochastic ``[layers, heads, T, T]``: a softmax of random logits."""
    logits = rng.normal(scale=2.0, size=(layers, heads, tokens, tokens))
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def reference_rollout(attention):
    """Abnar & Zuidema's rollout written out: 0.5 A + 0.5 I (rows of A sum to 1), the layers'
    matrices multiplied last layer on the left."""
    tokens = attention.shape[-1]
    mixed = [0.5 * a.mean(0) + 0.5 * np.eye(tokens) for a in attention.astype(np.float64)]
    return mixed[0] if len(mixed) == 1 else np.linalg.multi_dot(mixed[::-1])


@pytest.mark.parametrize("layers", [1, 3, 6])
@pytest.mark.parametrize("grid", [(4, 4), (2, 3)])
def test_rollout_matches_numpy_with_a_class_token(layers, grid):
    attention = random_attention(np.random.default_rng(layers), layers, 3, 1 + grid[0] * grid[1])
    got = attention_rollout(list(attention), class_token=True, grid=grid)
    want = reference_rollout(attention)[0, 1:].reshape(grid)
    assert got.shape == grid
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("layers", [1, 4])
def test_rollout_matches_numpy_with_mean_pooling(layers):
    attention = random_attention(np.random.default_rng(10 + layers), layers, 4, 16)
    got = attention_rollout(list(attention), class_token=False)  # default: a square grid
    want = reference_rollout(attention).mean(0).reshape(4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-12)


def test_rollout_rows_sum_to_one_and_identity_attention_spreads_evenly():
    attention = random_attention(np.random.default_rng(0), 5, 2, 10)
    np.testing.assert_allclose(rollout_matrix(list(attention)).sum(-1), 1.0, rtol=1e-12)
    # Every token attending only to itself: nothing mixes; mean pooling weighs patches equally.
    identity = np.broadcast_to(np.eye(9), (2, 3, 9, 9))
    np.testing.assert_allclose(rollout_matrix(list(identity)), np.eye(9))
    np.testing.assert_allclose(attention_rollout(list(identity), class_token=False), 1 / 9)
    # Uniform attention in one layer: half stays with each token, half spreads evenly.
    uniform = np.full((1, 1, 4, 4), 0.25)
    np.testing.assert_allclose(rollout_matrix(list(uniform)), 0.125 + 0.5 * np.eye(4))


@pytest.mark.parametrize(
    "attentions, kwargs, message",
    [
        ([], {}, "at least one layer"),
        ([np.ones((4, 4))], {}, "expected [heads, T, T]"),
        ([np.ones((1, 5, 5)) / 5, np.ones((1, 4, 4)) / 4], {}, "has 4 tokens, not 5"),
        ([np.ones((1, 7, 7)) / 7], {"grid": (2, 2)}, "6 patch tokens do not fill a 2x2 grid"),
    ],
)
def test_rollout_rejects_bad_shapes_with_a_clear_error(attentions, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        attention_rollout(attentions, class_token=True, **kwargs)


def test_upsample_repeats_each_patch_value_over_its_pixels():
    heat = np.arange(6.0).reshape(2, 3)
    big = upsample(heat, (4, 9))
    assert big.shape == (4, 9)
    np.testing.assert_array_equal(big[:2, :3], 0.0)
    np.testing.assert_array_equal(big[2:, 6:], 5.0)
    with pytest.raises(ValueError, match="does not tile a 5x9 image"):
        upsample(heat, (5, 9))


def tiny_mixer(num_blocks=3):
    config = MixerConfig(
        num_classes=4,
        image_size=(8, 12),
        num_channels=1,
        patch_size=(2, 2),
        hidden_size=8,
        num_blocks=num_blocks,
        tokens_mlp_dim=5,
        channels_mlp_dim=8,
    )
    return Mixer(config, rngs=nnx.Rngs(0))


def test_mixer_token_mixing_maps_are_the_first_layer_weights_on_the_patch_grid():
    model = tiny_mixer()
    maps = mixer_token_mixing(model, [0, 2])
    assert sorted(maps) == [0, 2]
    for block, got in maps.items():
        kernel = np.asarray(model.blocks[block].token_mixing.fc1.kernel[...])  # [24 patches, 5]
        assert got.shape == (5, 4, 6)
        for unit in range(5):
            for r in range(4):
                for c in range(6):
                    assert got[unit, r, c] == kernel[r * 6 + c, unit]
    # Token r * 6 + c is the patch at row r, column c: a lone bright patch there moves only it.
    image = np.zeros((1, 8, 12, 1), np.float32)
    image[0, 2:4, 8:10] = 1.0
    tokens = np.asarray(model.stem(jnp.asarray(image)) - model.stem(jnp.zeros_like(image)))
    changed = np.flatnonzero(np.abs(tokens.reshape(24, -1)).sum(-1))
    assert changed.tolist() == [1 * 6 + 4]


@pytest.mark.parametrize("blocks, expected", [(1, [0]), (4, [0, 1, 2, 3]), (12, [0, 4, 7, 11])])
def test_mixer_default_blocks_span_the_depth(blocks, expected):
    assert sorted(mixer_token_mixing(tiny_mixer(blocks))) == expected


def test_mixer_maps_reject_bad_blocks_and_kernels():
    with pytest.raises(ValueError, match=r"Mixer blocks \[3\] do not exist; accepted: 0..2"):
        mixer_token_mixing(tiny_mixer(), [0, 3])
    with pytest.raises(ValueError, match=r"kernel of shape \(6, 2\) is not \[4, units\]"):
        token_mixing_maps(np.zeros((6, 2)), (2, 2))


def test_tile_maps_scales_units_and_leaves_gaps():
    maps = np.arange(1.0, 1 + 5 * 2 * 3).reshape(5, 2, 3)
    mosaic = tile_maps(maps)  # 5 units: 3 columns, 2 rows
    assert mosaic.shape == (2 * 3 - 1, 3 * 4 - 1)
    np.testing.assert_allclose(mosaic[:2, :3], maps[0] / 6.0)
    assert np.isnan(mosaic[2]).all() and np.isnan(mosaic[:, 3]).all()
    assert np.isnan(mosaic[3:, 8:]).all()  # the sixth cell is empty
    assert tile_maps(maps, max_units=4).shape == (2 * 3 - 1, 2 * 4 - 1)


def tiny_vit_config(**overrides):
    fields = dict(
        num_classes=3,
        image_size=(8, 8),
        num_channels=1,
        patch_size=(2, 2),
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=16,
    )
    return {**fields, **overrides}


def random_images(batch=1, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, 8, 8, 1), minval=-1.0, maxval=1.0)


def test_vmoe_attentions_walk_gives_the_models_logits():
    config = VMoEConfig(
        **tiny_vit_config(num_layers=3), moe=MoeConfig(layers=(1,), num_experts=2, group_images=2)
    )
    model = VMoE(config, rngs=nnx.Rngs(1))
    images = random_images(batch=2)
    logits, attentions = vit_attentions(model, images)
    np.testing.assert_allclose(logits, np.asarray(model(images)[0]), rtol=1e-5, atol=1e-6)
    assert len(attentions) == 3 and attentions[0].shape == (2, 2, 17, 17)  # class token + 16
    np.testing.assert_allclose(np.sum(attentions[2], -1), 1.0, rtol=1e-5)


def png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_explain_image_writes_a_rollout_png(tmp_path, classifier):
    model = ViT(ViTConfig(**tiny_vit_config(classifier=classifier)), rngs=nnx.Rngs(0))
    path, label, probability, name = explain_image(
        model, random_images(), tmp_path / "out.png", class_names=("a", "b", "c")
    )
    width, height = png_size(path)
    assert width > 600 and height > 250
    assert 0 <= label < 3 and name == "abc"[label] and 0 < probability <= 1
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="explain takes one image"):
        explain_image(model, random_images(batch=2), tmp_path / "two.png")


def test_explain_image_writes_a_mixer_png(tmp_path):
    model = tiny_mixer(num_blocks=2)
    images = jnp.zeros((1, 8, 12, 1))
    path, label, probability, name = explain_image(model, images, tmp_path / "sub" / "m.png")
    width, height = png_size(path)
    assert width > 600 and height > 250
    assert name == str(label) and probability == pytest.approx(0.25)  # zero head: uniform


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


MIXER_TINY = [
    "model.hidden_size=16",
    "model.num_blocks=2",
    "model.tokens_mlp_dim=8",
    "model.channels_mlp_dim=16",
] + TINY[4:]


def one_line_error(result, message):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize("preset, tiny", [("vit-digits", TINY), ("mixer-digits", MIXER_TINY)])
def test_cli_explain(tmp_path, preset, tiny):
    from flaxlab.data import load_digits

    workdir = tmp_path / preset
    result = runner.invoke(app, ["train", preset, "--workdir", str(workdir), *sets(tiny)])
    assert result.exit_code == 0, result.output
    digit = tmp_path / "seven.png"
    test = load_digits("test")
    Image.fromarray(test.images[list(test.labels).index(7), :, :, 0]).save(digit)

    result = runner.invoke(app, ["explain", str(workdir), "--image", str(digit)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == str(workdir / "explain_seven.png") and lines[-2].startswith("predicted ")
    width, height = png_size(workdir / "explain_seven.png")
    assert width > 600 and height > 250

    out = tmp_path / "figs" / "mine.png"
    result = runner.invoke(
        app, ["explain", str(workdir), "--image", str(digit), "--out", str(out), "--step", "8"]
    )
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1] == str(out)
    assert png_size(out)[0] > 600

    result = runner.invoke(app, ["explain", str(workdir), "--image", str(tmp_path / "no.png")])
    one_line_error(result, "does not exist")


def test_cli_explain_rejects_runs_without_attention_or_mixing(tmp_path):
    from flaxlab.configs import get_preset
    from flaxlab.train import Workdir

    digit = tmp_path / "d.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(digit)
    for preset, family in [("vdm-digits", "vdm"), ("lit-digits", "lit")]:
        workdir = tmp_path / preset
        Workdir(workdir).prepare(get_preset(preset, []))
        result = runner.invoke(app, ["explain", str(workdir), "--image", str(digit)])
        one_line_error(result, f"holds a {family!r} run")
        assert "accepted families: ['vit', 'vmoe', 'mixer']" in result.output
    result = runner.invoke(app, ["explain", str(tmp_path / "none"), "--image", str(digit)])
    one_line_error(result, "not a flaxlab work directory")
