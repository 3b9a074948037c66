"""FavorKernel: the NNX module holding the projection, its redraw schedule and the rng seed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn import favor

B, L, H, D = 2, 6, 2, 8


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    num_features: int = 16
    favor_kernel: str = "softmax"
    feature_type: str = "orthogonal"
    redraw_every: int = 2


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(kk, (B, L, H, D)) for kk in ks)


def make_train_step(graphdef, params):
    """The lead's functional pattern: split -> jit(merge, call, split)."""

    @jax.jit
    def step(rest, q, k, v):
        model = nnx.merge(graphdef, params, rest)
        out = model(q, k, v, causal=True, deterministic=False)
        return out, nnx.split(model, nnx.Param, ...)[2]

    return step


def test_projection_is_state_but_not_a_param():
    kernel = favor.FavorKernel(KernelConfig(), D, rngs=nnx.Rngs(0))
    assert len(jax.tree.leaves(nnx.state(kernel, nnx.Param))) == 0
    projections = nnx.state(kernel, favor.FavorProjection)
    assert jax.tree.leaves(projections)[0].shape == (16, D)


def test_deterministic_calls_keep_the_projection(qkv):
    kernel = favor.FavorKernel(KernelConfig(), D, rngs=nnx.Rngs(0))
    before = np.asarray(kernel.projection[...])
    first = kernel(*qkv, causal=True)
    for _ in range(3):
        np.testing.assert_array_equal(kernel(*qkv, causal=True), first)
    np.testing.assert_array_equal(kernel.projection[...], before)
    assert int(kernel.calls[...]) == 0
    want = favor.favor_attention(*qkv, kernel.projection[...], causal=True)
    np.testing.assert_allclose(first, want, rtol=1e-6)


def test_redraw_every_n_training_calls_in_a_jitted_functional_step(qkv):
    kernel = favor.FavorKernel(KernelConfig(redraw_every=2), D, rngs=nnx.Rngs(favor=3))
    graphdef, params, rest = nnx.split(kernel, nnx.Param, ...)
    step = make_train_step(graphdef, params)
    seen = [np.asarray(kernel.projection[...])]
    for _ in range(5):
        out, rest = step(rest, *qkv)
        merged = nnx.merge(graphdef, params, rest)
        seen.append(np.asarray(merged.projection[...]))
        # the call attends with the projection it leaves behind
        want = favor.favor_attention(*qkv, merged.projection[...], causal=True)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert int(nnx.merge(graphdef, params, rest).calls[...]) == 5
    same = [np.array_equal(a, b) for a, b in zip(seen[:-1], seen[1:])]
    assert same == [True, False, True, False, True]  # calls 2 and 4 redraw
    assert not np.array_equal(seen[2], seen[4])
    # projection r is a pure function of the seed: draw(r) reproduces the schedule
    np.testing.assert_allclose(seen[2], kernel.draw(1), rtol=1e-6)
    np.testing.assert_allclose(seen[4], kernel.draw(2), rtol=1e-6)


def test_reproducible_from_the_seed_and_never_from_data(qkv):
    a = favor.FavorKernel(KernelConfig(redraw_every=1), D, rngs=nnx.Rngs(favor=5))
    b = favor.FavorKernel(KernelConfig(redraw_every=1), D, rngs=nnx.Rngs(favor=5))
    c = favor.FavorKernel(KernelConfig(redraw_every=1), D, rngs=nnx.Rngs(favor=6))
    np.testing.assert_array_equal(a.projection[...], b.projection[...])
    assert not np.array_equal(a.projection[...], c.projection[...])
    q, k, v = qkv
    a(q, k, v, deterministic=False)
    b(2.0 * q + 1.0, k, v, deterministic=False)  # different data, same schedule
    np.testing.assert_array_equal(a.projection[...], b.projection[...])


def test_no_redraw_when_redraw_every_is_zero(qkv):
    kernel = favor.FavorKernel(KernelConfig(redraw_every=0), D, rngs=nnx.Rngs(0))
    before = np.asarray(kernel.projection[...])
    for _ in range(3):
        kernel(*qkv, deterministic=False)
    np.testing.assert_array_equal(kernel.projection[...], before)
    assert int(kernel.calls[...]) == 3


@pytest.mark.parametrize("feature_type", ["deterministic", "iid"])
def test_relu_kernel_module(qkv, feature_type):
    config = KernelConfig(favor_kernel="relu", feature_type=feature_type, redraw_every=1)
    kernel = favor.FavorKernel(config, D, rngs=nnx.Rngs(params=1))
    mask = jnp.ones((B, L), bool).at[:, -2:].set(False)
    out = kernel(*qkv, mask=mask, deterministic=False)
    projection = None if feature_type == "deterministic" else kernel.projection[...]
    if feature_type == "deterministic":
        assert kernel.projection is None
    want = favor.favor_attention(*qkv, projection, kernel="relu", mask=mask)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"favor_kernel": "cosine"}, "favor_kernel"),
        ({"feature_type": "sobol"}, "feature_type"),
        ({"feature_type": "deterministic"}, "only valid with favor_kernel='relu'"),
        ({"num_features": 0}, "num_features"),
        ({"redraw_every": -1}, "redraw_every"),
    ],
)
def test_bad_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        favor.FavorKernel(dataclasses.replace(KernelConfig(), **changes), D, rngs=nnx.Rngs(0))


def test_wrong_head_dim_raises(qkv):
    kernel = favor.FavorKernel(KernelConfig(), D + 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head dim"):
        kernel(*qkv)
