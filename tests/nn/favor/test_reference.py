"""The reference causal formula kept as a yardstick."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab.nn import favor
from tests.reference.favor import np_causal_reference_style


def test_reference_scan_matches_the_reference_formula(qkv, proj):
    """The re-implementation of the reference's per-token scan computes the reference's (leaky,
    global-max) causal formula, so benchmark timings against it compare like with like."""
    q, k, v = qkv
    got = jax.jit(favor.reference_causal_favor)(q, k, v, proj)
    np.testing.assert_allclose(got, np_causal_reference_style(q, k, v, proj), rtol=1e-4, atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(favor.reference_causal_favor(*a, proj) ** 2)))(
        q, k, v
    )
    assert np.all(np.isfinite(grads))
