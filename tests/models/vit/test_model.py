import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.models import ViT, ViTConfig, count_parameters
from tests.reference import transformer as ref


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("B/16", 86_567_656),
        ("Ti/16", 5_717_416),
        ("S/16", 22_050_664),
        ("R50+B/16", 98_659_112),  # the hybrid: ResNet-50 stem (3 stages), then 1x1 patches
    ],
)
def test_parameter_counts_match_the_reference(variant, expected):
    model = nnx.eval_shape(
        lambda: ViT(ViTConfig.variant(variant, num_classes=1000), rngs=nnx.Rngs(0))
    )
    assert count_parameters(model) == expected


def test_variant_fields_and_overrides():
    c = ViTConfig.variant("S/32", num_classes=7, image_size=64, classifier="gap")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.mlp_dim) == (384, 12, 6, 1536)
    assert c.patch_size == (32, 32) and c.image_size == (64, 64) and c.num_classes == 7
    with pytest.raises(ValueError, match="unknown ViT variant 'B/17'.*'B/16'"):
        ViTConfig.variant("B/17")
    with pytest.raises(ValueError, match="classifier='cls'.*token"):
        ViTConfig(classifier="cls")
    with pytest.raises(ValueError, match="image height 30 is not a multiple of the patch size 16"):
        ViTConfig(image_size=(30, 32))


TINY = dict(
    num_classes=5,
    image_size=(8, 12),
    num_channels=2,
    patch_size=(4, 4),
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    mlp_dim=32,
)


def randomized(model, seed=1):
    """Random non-zero parameters everywhere (head, biases, LayerNorm included)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.3), state))
    return model


def vit_numpy(x, p, cfg):
    """Float64 NumPy ViT forward (conv patch embedding as a reshape + matmul)."""
    b, h, w, c = x.shape
    ph, pw = cfg.patch_size
    patches = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, -1, ph * pw * c)
    kernel = p["embedding"]["kernel"].reshape(ph * pw * c, -1)
    t = patches @ kernel + p["embedding"]["bias"]
    if cfg.classifier == "token":
        t = np.concatenate([np.broadcast_to(p["cls"], (b, 1, t.shape[-1])), t], axis=1)
    t = t + p["posemb"]
    for i in range(cfg.num_layers):
        t = ref.encoder_block(t, p["encoder"]["blocks"][i], cfg.num_heads)
    n = p["encoder"]["encoder_norm"]
    t = ref.layer_norm(t, n["scale"], n["bias"])
    t = t[:, 0] if cfg.classifier == "token" else t.mean(1)
    if cfg.representation_size:
        t = np.tanh(ref.dense(t, p["pre_logits"]))
    return ref.dense(t, p["head"])


@pytest.mark.parametrize("classifier, representation", [("token", None), ("gap", 6)])
def test_forward_matches_numpy(classifier, representation):
    cfg = ViTConfig(**TINY, classifier=classifier, representation_size=representation)
    model = randomized(ViT(cfg, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 8, 12, 2)).astype(np.float32)
    p = ref.to_numpy64(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(model(jnp.asarray(x)), vit_numpy(x, p, cfg), rtol=1e-4, atol=1e-4)


def test_head_is_zero_initialised_and_posemb_includes_class_slot():
    model = ViT(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    assert model.posemb.shape == (1, 2 * 3 + 1, 16)
    np.testing.assert_array_equal(model.head.kernel[...], 0.0)
    assert 0.01 < float(jnp.std(model.posemb[...])) < 0.03


def sincos2d_numpy(h, w, dim):
    """big_vision's posemb_sincos_2d, written independently in float64."""
    q = dim // 4
    omega = np.array([10000.0 ** (-k / (q - 1)) for k in range(q)])
    rows = []
    for y in range(h):
        for x in range(w):
            rows.append(
                np.concatenate(
                    [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
                )
            )
    return np.stack(rows)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_sincos2d_position_embedding_init(classifier):
    from flaxlab.models.vit import posemb_sincos2d

    config = ViTConfig(**dict(TINY, classifier=classifier), posemb_init="sincos2d")
    model = ViT(config, rngs=nnx.Rngs(0))
    want = sincos2d_numpy(*config.grid_size, config.hidden_size)
    got = np.asarray(model.posemb[...])[0]
    if classifier == "token":  # the class-token slot starts at zero
        np.testing.assert_array_equal(got[0], 0.0)
        got = got[1:]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(posemb_sincos2d((3, 5), 8), sincos2d_numpy(3, 5, 8), atol=1e-6)
    assert isinstance(model.posemb, nnx.Param)  # it keeps learning
    with pytest.raises(ValueError, match="^posemb_init='fixed' is not supported; accepted"):
        ViTConfig(**TINY, posemb_init="fixed")
    with pytest.raises(ValueError, match="multiple of 4 and >= 8, got 18"):
        ViTConfig(**dict(TINY, hidden_size=18, num_heads=2), posemb_init="sincos2d")


def test_wrong_image_shape_and_dtype_name_both():
    model = ViT(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, 8, 12, 2\].*got shape \(1, 8, 8, 2\)"):
        model(jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError, match="uint8"):
        model(jnp.zeros((1, 8, 12, 2), jnp.uint8))


def test_bfloat16_compute_returns_float32_logits():
    model = ViT(ViTConfig(**TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 8, 12, 2))).dtype == jnp.float32
    with pytest.raises(ValueError, match="dtype='float8'"):
        ViTConfig(**TINY, dtype="float8")


def test_capture_returns_attention_weights_and_block_features():
    cfg = ViTConfig(**TINY)
    model = randomized(ViT(cfg, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, size=(3, 8, 12, 2)), jnp.float32)
    logits, captured = model(x, capture=("attention", "features"))
    np.testing.assert_allclose(logits, model(x), rtol=1e-5, atol=1e-6)
    assert len(captured["attention"]) == len(captured["features"]) == cfg.num_layers
    weights = np.asarray(captured["attention"][0])
    assert weights.shape == (3, 4, 7, 7)  # [batch, heads, tokens, tokens], class token included
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    # The first block's weights are softmax(q k^T / sqrt(d)) of its normalised input.
    p = ref.to_numpy64(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    t = np.asarray(model.embed(x), np.float64)
    b0 = p["encoder"]["blocks"][0]
    y = ref.layer_norm(t, b0["norm1"]["scale"], b0["norm1"]["bias"])
    q = ref.dense(y, b0["attn"]["query"]).reshape(3, 7, 4, 4)
    k = ref.dense(y, b0["attn"]["key"]).reshape(3, 7, 4, 4)
    want = ref.softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
    np.testing.assert_allclose(weights, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="capture=\\('gradients',\\)"):
        model(x, capture=("gradients",))
