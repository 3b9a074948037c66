"""LiT's towers, tokenizers, zero-shot classifier and the locked image tower in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.configs import get_preset
from flaxlab.data.factory import make_data
from flaxlab.models.lit import (
    ByteTokenizer,
    LiT,
    LiTConfig,
    TextConfig,
    make_tokenizer,
    tokenize_prompts,
    zero_shot_classifier,
)
from flaxlab.models.vit import ViTConfig
from flaxlab.train import Estimator, sharding

TINY_VIT = ViTConfig(
    num_classes=10,
    image_size=(8, 8),
    num_channels=1,
    patch_size=(2, 2),
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_dim=32,
    classifier="gap",
)
TINY_TEXT = TextConfig(max_len=12, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)


def test_byte_tokenizer_pads_with_a_sticky_eos():
    tokens = ByteTokenizer()(["ab", "é", "a long text"], 5)
    assert tokens.dtype == np.int32 and tokens.shape == (3, 5)
    assert tokens[0].tolist() == [ord("a") + 2, ord("b") + 2, 1, 1, 1]
    assert tokens[1].tolist()[:3] == [0xC3 + 2, 0xA9 + 2, 1]  # UTF-8 bytes
    assert tokens[2].tolist() == [ord(c) + 2 for c in "a lo"] + [1]  # cut, EOS kept last
    with pytest.raises(ValueError, match="tokenizer='words'"):
        make_tokenizer("words")


def test_sentencepiece_needs_its_extra_or_a_model_file(tmp_path):
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"flaxlab\[text\]"):
            make_tokenizer(str(tmp_path / "m.model"))
    else:
        with pytest.raises(OSError):
            make_tokenizer(str(tmp_path / "m.model"))


@pytest.fixture(scope="module")
def model():
    return LiT(LiTConfig(image=TINY_VIT, text=TINY_TEXT), rngs=nnx.Rngs(0))


def test_embeddings_are_normalised_and_the_temperature_starts_at_ten(model):
    images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1)
    tokens = jnp.asarray(ByteTokenizer()(["one", "two", "three"], 12))
    zimg, ztxt = model(images, tokens)
    assert zimg.shape == ztxt.shape == (3, 16)  # the image representation's width
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
    assert float(model.temperature) == pytest.approx(10.0)
    sigmoid = LiT(LiTConfig(image=TINY_VIT, text=TINY_TEXT, loss="sigmoid"), rngs=nnx.Rngs(0))
    assert float(sigmoid.bias) == -10.0


def test_zero_shot_classifier_averages_templates_then_renormalises(model):
    tokens = tokenize_prompts(
        ("cat", "dog"), ("a {name}", "the {name} number {label}"), "bytes", 12
    )
    assert tokens.shape == (2, 2, 12)
    got = np.asarray(zero_shot_classifier(model, jnp.asarray(tokens)), np.float64)
    z = np.asarray(model.embed_texts(jnp.asarray(tokens.reshape(4, 12))), np.float64)
    mean = z.reshape(2, 2, -1).mean(axis=1)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="model.loss='hinge'"):
        LiTConfig(image=TINY_VIT, loss="hinge")
    with pytest.raises(ValueError, match="model.image_family='vdm'"):
        LiTConfig(image_family="vdm")
    with pytest.raises(ValueError, match="embed_dim=32 differs"):
        LiTConfig(image=TINY_VIT, embed_dim=32)


def test_a_locked_tower_has_no_optimizer_state_and_never_changes(tmp_path):
    overrides = [
        "model.image.hidden_size=16",
        "model.image.num_layers=1",
        "model.image.num_heads=2",
        "model.image.mlp_dim=32",
        "model.text.hidden_size=16",
        "model.text.num_layers=1",
        "model.text.num_heads=2",
        "model.text.mlp_dim=32",
        "data.batch_size=16",
        "optimizer.learning_rate=0.01",
        "optimizer.warmup_steps=0",
    ]
    config = get_preset("lit-digits", overrides)
    estimator = Estimator(config, tmp_path, progress=False)
    state = estimator.init_state()
    before = jax.tree.map(np.asarray, state["params"])
    # No slot for a frozen parameter: the optimizer state holds the text tower's only.
    slots = sum(int(np.size(x)) for x in jax.tree.leaves(state["opt_state"]))
    trainable = sum(
        int(np.size(x)) for k, x in before.items() if k != "image" for x in jax.tree.leaves(x)
    )
    assert trainable < slots < 3 * trainable  # AdamW: two moments of the trainable ones
    step = estimator.make_train_step()
    batches = make_data(config.data)[0]
    for i in range(3):
        state, metrics = step(state, sharding.shard_batch(batches(i), estimator.mesh))
    after = jax.tree.map(np.asarray, state["params"])
    jax.tree.map(np.testing.assert_array_equal, after["image"], before["image"])
    moved = [
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(after["text"]), jax.tree.leaves(before["text"]))
    ]
    assert max(moved) > 0 and np.isfinite(float(metrics["loss"]))
