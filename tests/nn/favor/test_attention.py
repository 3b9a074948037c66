"""Bidirectional FAVOR+ attention and input checks vs float64 NumPy twins."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn import favor
from tests.nn.favor.common import B, L, attend
from tests.reference.favor import np_bidirectional

# ----------------------------------------------------------------------------- bidirectional


@pytest.mark.parametrize(
    "kernel,use_proj,renormalize",
    [
        ("softmax", True, True),
        ("softmax", True, False),
        ("relu", True, True),
        ("relu", False, True),
    ],
)
def test_bidirectional_matches_numpy(qkv, proj, kernel, use_proj, renormalize):
    q, k, v = qkv
    w = proj if use_proj else None
    got = attend(q, k, v, w, kernel=kernel, renormalize=renormalize)
    want = np_bidirectional(q, k, v, w, kernel, renormalize=renormalize)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bidirectional_cross_attention_and_mask(qkv, proj, mask):
    q, k, v = qkv
    got = attend(q[:, :5], k, v, proj, mask=mask)
    want = np_bidirectional(q[:, :5], k, v, proj, mask=np.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Masked keys are invisible: replacing them with anything changes nothing.
    junk = jnp.where(mask[:, :, None, None], k, -30.0), jnp.where(mask[:, :, None, None], v, 9.0)
    np.testing.assert_allclose(attend(q, *junk, proj, mask=mask), attend(q, k, v, proj, mask=mask))


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise(qkv, proj):
    q, k, v = qkv
    with pytest.raises(ValueError, match="kernel must be one of"):
        favor.favor_attention(q, k, v, proj, kernel="cosine")
    with pytest.raises(ValueError, match="needs a projection"):
        favor.favor_attention(q, k, v)
    with pytest.raises(ValueError, match="rank 4"):
        favor.favor_attention(q[0], k, v, proj)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        favor.favor_attention(q[:, :3], k, v, proj, causal=True)
    with pytest.raises(ValueError, match="mask must be"):
        favor.favor_attention(q, k, v, proj, mask=jnp.ones((B, L + 1), bool))
    with pytest.raises(ValueError, match="projection must have shape"):
        favor.softmax_kernel_features(q, proj[:, :3], is_query=True)
    with pytest.raises(ValueError, match="chunk_size"):
        favor.favor_attention(q, k, v, proj, causal=True, chunk_size=0)
