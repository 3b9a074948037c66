"""Tokens for the MoE layer tests."""

import jax
import pytest

from tests.nn.moe.common import D


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (2, 9, D))
