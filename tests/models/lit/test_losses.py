"""The contrastive losses against float64 NumPy twins (masks included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.models.lit import sigmoid_contrastive_loss, softmax_contrastive_loss


def unit_rows(rng, n, d):
    z = rng.normal(size=(n, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_softmax_loss(zimg, ztxt, t, mask=None):
    keep = np.ones(len(zimg), bool) if mask is None else np.asarray(mask, bool)
    zimg, ztxt = zimg[keep], ztxt[keep]
    logits = zimg @ ztxt.T * t
    i = np.arange(len(logits))
    per = 0.5 * (-np_log_softmax(logits, 1)[i, i] - np_log_softmax(logits, 0)[i, i])
    return per.mean()


def np_sigmoid_loss(zimg, ztxt, t, b):
    logits = zimg @ ztxt.T * t + b
    z = 2 * np.eye(len(logits)) - 1
    return -np.sum(-np.logaddexp(0, -z * logits)) / len(logits)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    return unit_rows(rng, 7, 5), unit_rows(rng, 7, 5)


@pytest.mark.parametrize("t", [1.0, 10.0])
def test_softmax_loss_matches_numpy(pairs, t):
    zimg, ztxt = pairs
    got = softmax_contrastive_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t)
    assert float(got) == pytest.approx(np_softmax_loss(zimg, ztxt, t), rel=1e-5)


def test_masked_examples_leave_both_softmaxes_and_the_mean(pairs):
    zimg, ztxt = pairs
    mask = np.array([1, 0, 1, 1, 0, 1, 1])
    got = softmax_contrastive_loss(jnp.asarray(zimg), jnp.asarray(ztxt), 10.0, jnp.asarray(mask))
    assert float(got) == pytest.approx(np_softmax_loss(zimg, ztxt, 10.0, mask), rel=1e-5)
    # Whatever the masked rows hold changes nothing, and gradients stay finite.
    junk = zimg.copy()
    junk[mask == 0] = 100.0

    def loss(z):
        return softmax_contrastive_loss(z, jnp.asarray(ztxt), 10.0, jnp.asarray(mask))

    assert float(loss(jnp.asarray(junk))) == pytest.approx(float(got), rel=1e-6)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(junk)))
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("t, b", [(10.0, -10.0), (3.0, 0.5)])
def test_sigmoid_loss_matches_numpy(pairs, t, b):
    zimg, ztxt = pairs
    got = sigmoid_contrastive_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t, b)
    assert float(got) == pytest.approx(np_sigmoid_loss(zimg, ztxt, t, b), rel=1e-5)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[N, D\] of one shape"):
        softmax_contrastive_loss(jnp.ones((3, 2)), jnp.ones((4, 2)), 1.0)
