"""The FAVOR+ tests' inputs: queries/keys/values, a projection and a key mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn import favor
from tests.nn.favor.common import B, D, H, L, M


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(1), 3)
    return tuple(jax.random.normal(kk, (B, L, H, D)) for kk in ks)


@pytest.fixture(scope="module")
def proj():
    return favor.gaussian_orthogonal_random_matrix(jax.random.key(7), M, D)


@pytest.fixture(scope="module")
def mask():
    m = np.ones((B, L), bool)
    m[0, 9:] = False
    m[1, :3] = False  # leading padding: queries 0..2 of row 1 see no key
    return jnp.asarray(m)
