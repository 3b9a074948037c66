import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn import AttentionConfig, Encoder, EncoderBlock, MultiHeadAttention, drop_path
from tests.reference import transformer as ref


def params64(module):
    return ref.to_numpy64(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def randomize(module, seed=1):
    """Non-trivial parameters (biases, LayerNorm) so the reference check covers every term."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


@pytest.fixture(scope="module")
def block():
    return randomize(EncoderBlock(16, 4, 32, rngs=nnx.Rngs(0)))


def test_encoder_block_matches_numpy(block):
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    got = block(jnp.asarray(x))
    want = ref.encoder_block(x.astype(np.float64), params64(block), 4)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_encoder_block_causal_and_mask_match_numpy(block):
    x = np.random.default_rng(1).normal(size=(2, 6, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    p = params64(block)
    got = block(jnp.asarray(x), causal=True)
    np.testing.assert_allclose(got, ref.encoder_block(x, p, 4, causal=True), rtol=2e-4, atol=2e-4)
    got = block(jnp.asarray(x), mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, ref.encoder_block(x, p, 4, mask=mask), rtol=2e-4, atol=2e-4)


def test_causal_attention_ignores_future():
    attn = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(1, 6, 8)).astype(np.float32)
    y = x.copy()
    y[:, 4:] += 5.0
    a, b = attn(jnp.asarray(x), causal=True), attn(jnp.asarray(y), causal=True)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_attention_dropout_path_equals_fused_path_without_drops():
    # The explicit einsum path (used for attention dropout) must compute the same attention.
    cfg = AttentionConfig(dropout_rate=1e-9)
    attn = MultiHeadAttention(8, 2, cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 8)), jnp.float32)
    fused = attn(x, causal=True, deterministic=True)
    explicit = attn(x, causal=True, deterministic=False, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)


def test_encoder_dropout_is_random_in_training_and_off_in_eval():
    enc = Encoder(8, 2, 2, 16, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3, 8))
    a = enc(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b = enc(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(enc(x), enc(x))
    assert len(enc.blocks) == 2


def test_drop_path_drops_whole_examples_and_keeps_expectation():
    x = jnp.ones((4000, 3, 2))
    y = drop_path(x, 0.25, deterministic=False, rngs=nnx.Rngs(dropout=0))
    per_example = np.asarray(y).reshape(4000, -1)
    values = np.unique(per_example)
    assert len(values) == 2
    np.testing.assert_allclose(values, [0.0, 1.0 / 0.75], rtol=1e-6)
    assert np.all(per_example.min(1) == per_example.max(1))  # whole example kept or dropped
    assert abs(per_example.mean() - 1.0) < 0.05
    np.testing.assert_array_equal(drop_path(x, 0.25, deterministic=True, rngs=None), x)


def test_drop_path_rate_grows_linearly_with_depth():
    enc = Encoder(8, 3, 2, 16, drop_path_rate=0.2, rngs=nnx.Rngs(0))
    assert [b.drop_path_rate for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_bad_attention_settings_name_the_value():
    with pytest.raises(ValueError, match="kind='nope'.*favor"):
        AttentionConfig(kind="nope")
    with pytest.raises(ValueError, match="hidden_size=10 is not divisible by num_heads=4"):
        MultiHeadAttention(10, 4, rngs=nnx.Rngs(0))
