"""FAVOR+ random projections and feature maps vs float64 NumPy twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn import favor
from tests.reference.favor import np_relu_features, np_softmax_features

# ----------------------------------------------------------------------------- projections


@pytest.mark.parametrize("num_features,dim", [(24, 8), (20, 8), (5, 8)])
def test_orthogonal_rows_within_blocks(num_features, dim):
    w = np.asarray(
        favor.gaussian_orthogonal_random_matrix(jax.random.key(3), num_features, dim, scaling=1),
        np.float64,
    )
    assert w.shape == (num_features, dim)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), np.sqrt(dim), rtol=1e-5)
    for start in range(0, num_features, dim):
        block = w[start : start + dim] / np.sqrt(dim)
        np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-5)
    # Different blocks are independent draws, not orthogonal to each other.
    if num_features > dim:
        assert np.abs(w[:dim] @ w[dim : 2 * dim].T).max() > 1e-2


def test_orthogonal_scaling_zero_uses_chi_norms_of_the_key():
    key = jax.random.key(11)
    w = np.asarray(favor.gaussian_orthogonal_random_matrix(key, 20, 8, scaling=0), np.float64)
    expected = np.linalg.norm(np.asarray(jax.random.normal(key, (20, 8)), np.float64), axis=1)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), expected, rtol=1e-5)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(unit[:8] @ unit[:8].T, np.eye(8), atol=1e-5)


def test_iid_and_draw_projection():
    key = jax.random.key(2)
    np.testing.assert_array_equal(
        favor.gaussian_random_matrix(key, 6, 4), jax.random.normal(key, (6, 4))
    )
    np.testing.assert_array_equal(
        favor.draw_projection(key, 6, 4, "iid"), favor.gaussian_random_matrix(key, 6, 4)
    )
    np.testing.assert_array_equal(
        favor.draw_projection(key, 6, 4, "orthogonal"),
        favor.gaussian_orthogonal_random_matrix(key, 6, 4),
    )
    assert favor.draw_projection(key, 6, 4, "deterministic") is None
    with pytest.raises(ValueError, match="feature_type"):
        favor.draw_projection(key, 6, 4, "fourier")
    with pytest.raises(ValueError, match="scaling"):
        favor.gaussian_orthogonal_random_matrix(key, 6, 4, scaling=2)
    with pytest.raises(ValueError, match="num_features"):
        favor.gaussian_random_matrix(key, 0, 4)


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("is_query", [True, False])
def test_softmax_features_match_numpy(qkv, proj, mask, is_query):
    x = qkv[0]
    got = favor.softmax_kernel_features(x, proj, is_query=is_query)
    np.testing.assert_allclose(got, np_softmax_features(x, proj, is_query), rtol=2e-5, atol=1e-9)
    if not is_query:
        got = favor.softmax_kernel_features(x, proj, is_query=False, mask=mask)
        want = np_softmax_features(x, proj, False, mask=np.asarray(mask))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
        # Padding content must not move the features of valid keys.
        noisy = jnp.where(mask[:, :, None, None], x, 50.0)
        np.testing.assert_allclose(
            favor.softmax_kernel_features(noisy, proj, is_query=False, mask=mask), got, rtol=1e-6
        )


def test_relu_features_match_numpy(qkv, proj, mask):
    x = qkv[1]
    np.testing.assert_allclose(favor.relu_kernel_features(x), np_relu_features(x), rtol=1e-6)
    np.testing.assert_allclose(
        favor.relu_kernel_features(x, proj, mask=mask),
        np_relu_features(x, proj, mask=np.asarray(mask)),
        rtol=1e-5,
        atol=1e-7,
    )
    got = favor.relu_kernel_features(x, proj, epsilon=0.1, kernel_fn=jnp.square)
    np.testing.assert_allclose(got, np_relu_features(x, proj, 0.1, np.square), rtol=1e-5)


def reference_orthogonal_matrix(key, num_features, dim):
    """The reference's eager loop (performer fast_attention.py): one chained split, Gaussian
    block and QR per block of ``dim`` rows, rows rescaled by chi norms drawn from ``key``."""
    blocks, rng = [], key
    for _ in range(num_features // dim):
        rng, block_key = jax.random.split(rng)
        q, _ = jnp.linalg.qr(jax.random.normal(block_key, (dim, dim)))
        blocks.append(q.T)
    remaining = num_features - (num_features // dim) * dim
    if remaining:
        rng, block_key = jax.random.split(rng)
        q, _ = jnp.linalg.qr(jax.random.normal(block_key, (dim, dim)))
        blocks.append(q.T[:remaining])
    norms = jnp.linalg.norm(jax.random.normal(key, (num_features, dim)), axis=1)
    return jnp.matmul(jnp.diag(norms), jnp.vstack(blocks))


@pytest.mark.parametrize("num_features,dim", [(1000, 8), (256, 64)])
def test_orthogonal_matrix_is_the_references_bit_for_bit(num_features, dim):
    key = jax.random.key(1)
    got = favor.gaussian_orthogonal_random_matrix(key, num_features, dim)
    np.testing.assert_array_equal(got, reference_orthogonal_matrix(key, num_features, dim))


def test_orthogonal_matrix_builds_batched_at_any_size():
    # One block per row at d = 1: 10,000 blocks (minutes and 5.8 GB when the key chain was
    # unrolled inside jit); each 1x1 block is +-1, so rows are +-(chi norm).
    key = jax.random.key(2)
    w = np.asarray(favor.gaussian_orthogonal_random_matrix(key, 10_000, 1))
    norms = np.abs(np.asarray(jax.random.normal(key, (10_000, 1))))
    np.testing.assert_allclose(np.abs(w), norms, rtol=1e-6)
