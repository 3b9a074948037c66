"""Strictly causal FAVOR+ (both implementations) and O(1) decoding vs float64 NumPy twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn import favor
from tests.nn.favor.common import B, D, H, L, M, attend
from tests.reference.favor import (
    np_causal_reference_style,
    np_causal_relu,
    np_causal_running_max,
    np_exact_attention,
)

# ----------------------------------------------------------------------------- causal


IMPLEMENTATIONS = ["scan", "batched"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, None])
def test_causal_matches_numpy_running_max(qkv, proj, chunk_size, implementation):
    q, k, v = qkv
    got = attend(q, k, v, proj, causal=True, chunk_size=chunk_size, implementation=implementation)
    np.testing.assert_allclose(got, np_causal_running_max(q, k, v, proj), rtol=1e-4, atol=2e-5)


def test_scan_chunk_size_keeps_one_chunk_of_features_small():
    assert favor.scan_chunk_size(4096, 8, 256) == 64  # batch 1, 8 heads, M = 256
    assert favor.scan_chunk_size(128, 32 * 4, 64) == 16  # the Performer LM preset's attention
    assert favor.scan_chunk_size(4096, 16, 256) == 32
    assert favor.scan_chunk_size(4096, 4096, 256) == 16  # never below 16
    assert favor.scan_chunk_size(10, 1, 8) == 10  # capped at the length


def test_default_implementation_by_backend():
    expected = "scan" if jax.default_backend() == "cpu" else "batched"
    assert favor.default_implementation() == expected
    q = jnp.ones((1, 4, 1, 8))
    w = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="implementation must be one of .*'fused'"):
        favor.favor_attention(q, q, q, w, causal=True, implementation="fused")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_causal_unnormalized_and_masked(qkv, proj, mask, implementation):
    q, k, v = qkv
    impl = dict(implementation=implementation)
    got = attend(q, k, v, proj, causal=True, renormalize=False, chunk_size=4, **impl)
    want = np_causal_running_max(q, k, v, proj, renormalize=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    got = attend(q, k, v, proj, causal=True, mask=mask, chunk_size=4, **impl)
    want = np_causal_running_max(q, k, v, proj, mask=np.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    assert np.all(np.asarray(got)[1, :3] == 0.0)  # no valid key yet: output 0, not NaN


def test_causal_stays_close_to_the_reference_formula(qkv, proj):
    q, k, v = qkv
    got = attend(q, k, v, proj, causal=True)
    np.testing.assert_allclose(got, np_causal_reference_style(q, k, v, proj), atol=3e-3)


@pytest.mark.parametrize("use_proj", [True, False])
def test_causal_relu_matches_numpy(qkv, proj, mask, use_proj):
    q, k, v = qkv
    w = proj if use_proj else None
    got = attend(q, k, v, w, kernel="relu", causal=True, mask=mask, chunk_size=5)
    want = np_causal_relu(q, k, v, w, mask=np.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_strictly_causal(qkv, proj, kernel):
    q, k, v = qkv
    cut = 7
    future = jax.random.normal(jax.random.key(5), (3, B, L - cut, H, D))
    q2, k2, v2 = (jnp.concatenate([x[:, :cut], 3.0 * f], axis=1) for x, f in zip(qkv, future))
    k2 = k2.at[:, -1].set(40.0 * k2[:, -1])  # an outlier last key
    for chunk_size, implementation in ((4, "scan"), (4, "batched"), (None, None)):
        options = dict(kernel=kernel, causal=True, chunk_size=chunk_size)
        options["implementation"] = implementation
        before = attend(q, k, v, proj, **options)
        after = attend(q2, k2, v2, proj, **options)
        np.testing.assert_allclose(after[:, :cut], before[:, :cut], rtol=0, atol=1e-6)
    if kernel == "softmax":  # the same perturbation moves the reference's past outputs
        leak = np_causal_reference_style(q2, k2, v2, proj) - np_causal_reference_style(
            q, k, v, proj
        )
        assert np.abs(leak[:, :cut]).max() > 1e-2


def test_many_features_approach_exact_softmax():
    ks = jax.random.split(jax.random.key(9), 4)
    q, k = (0.5 * jax.random.normal(kk, (1, 16, 1, 8)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (1, 16, 1, 8))
    w = favor.gaussian_orthogonal_random_matrix(ks[3], 4096, 8)
    exact_bi, exact_causal = np_exact_attention(q, k, v, False), np_exact_attention(q, k, v, True)
    uniform = np.asarray(v, np.float64).mean(axis=1, keepdims=True)
    assert np.abs(exact_bi - uniform).max() > 0.12  # exact attention is far from uniform
    np.testing.assert_allclose(attend(q, k, v, w), exact_bi, atol=0.05)
    np.testing.assert_allclose(attend(q, k, v, w, causal=True), exact_causal, atol=0.05)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kernel,use_proj", [("softmax", True), ("relu", True), ("relu", False)])
def test_recurrent_decoding_matches_causal(qkv, proj, mask, kernel, use_proj):
    q, k, v = qkv
    w = proj if use_proj else None
    num_features = M if use_proj else D
    state = favor.favor_causal_init_state(B, H, num_features, D, kernel=kernel)
    step = jax.jit(favor.favor_causal_step, static_argnames=("kernel",))
    outputs = []
    for t in range(L):
        state, y = step(state, q[:, t], k[:, t], v[:, t], w, kernel=kernel, mask_t=mask[:, t])
        outputs.append(y)
    full = attend(q, k, v, w, kernel=kernel, causal=True, mask=mask, chunk_size=4)
    np.testing.assert_allclose(jnp.stack(outputs, axis=1), full, rtol=1e-4, atol=1e-5)
