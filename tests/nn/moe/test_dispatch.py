"""Dispatchers of flaxlab.nn.moe.dispatch vs a float64 NumPy mixture of experts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn.moe.dispatch import combine, dispatch, moe_mlp
from flaxlab.nn.moe.experts import expert_mlp
from flaxlab.nn.moe.routing import experts_choice_routing, top_k_routing
from tests.reference.moe import expert as np_expert

G, S, E, D, H = 2, 12, 4, 6, 10


def np_moe(params, x, gates, kept):
    """y[g, s] = sum over kept (expert e) of gate[g, s, e] * expert_e(x[g, s])."""
    y = np.zeros(x.shape[:2] + (params["fc2_bias"].shape[-1],))
    for g, s, e in zip(*np.nonzero(kept), strict=True):
        y[g, s] += gates[g, s, e] * np_expert(params, e, x[g, s])
    return y


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    params = {
        "fc1_kernel": rng.normal(size=(E, D, H)) / np.sqrt(D),
        "fc1_bias": rng.normal(size=(E, H)) * 0.1,
        "fc2_kernel": rng.normal(size=(E, H, D)) / np.sqrt(H),
        "fc2_bias": rng.normal(size=(E, D)) * 0.1,
    }
    x = rng.normal(size=(G, S, D))
    logits = rng.normal(size=(G, S, E)) * 2
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return params, x, logits, jax.tree.map(f32, params), f32(x), f32(logits)


@functools.cache
def jitted_moe(kind, k, capacity, experts_choice=False):
    def run(params, x, logits):
        if experts_choice:
            routing = experts_choice_routing(logits, capacity=capacity)
        else:
            routing = top_k_routing(logits, k, capacity=capacity)
        return moe_mlp(params, x, routing, kind), routing.dispatch, routing.gates

    return jax.jit(run)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def dispatcher_grad(params, x, logits, kind, k, capacity):
    def loss(params, x, logits):
        routing = top_k_routing(logits, k, capacity=capacity)
        return jnp.sum(moe_mlp(params, x, routing, kind) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2))(params, x, logits)


@pytest.mark.parametrize("kind", ["einsum", "indices"])
@pytest.mark.parametrize("k, capacity", [(1, 2), (2, 3), (2, 24)])
def test_buffered_dispatchers_match_numpy(data, kind, k, capacity):
    params, x, _, params32, x32, logits32 = data
    y, dispatch_mask, gates = jitted_moe(kind, k, capacity)(params32, x32, logits32)
    kept = np.asarray(dispatch_mask).any(-1)
    want = np_moe(params, x, np.asarray(gates, np.float64), kept)
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_ragged_is_dropless(data, k):
    params, x, _, params32, x32, logits32 = data
    y, dispatch_mask, gates = jitted_moe("ragged", k, 2)(params32, x32, logits32)
    gates = np.asarray(gates, np.float64)
    top_k = np.argsort(-gates, -1, kind="stable")[..., :k]
    every_choice = np.zeros(gates.shape, bool)
    np.put_along_axis(every_choice, top_k, True, axis=-1)
    assert every_choice.sum() > np.asarray(dispatch_mask).sum()  # capacity 2 drops some
    np.testing.assert_allclose(np.asarray(y), np_moe(params, x, gates, every_choice), atol=2e-5)
    # Where capacity is not exceeded, all three dispatchers agree.
    outs = [
        jitted_moe(kind, k, S * k)(params32, x32, logits32)[0]
        for kind in ("einsum", "indices", "ragged")
    ]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    # ... and so do their gradients (parameters, tokens and router logits).
    grads = [
        dispatcher_grad(params32, x32, logits32, kind, k, S * k) for kind in ("einsum", "ragged")
    ]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", ["einsum", "indices"])
def test_experts_choice_dispatch(data, kind):
    params, x, _, params32, x32, logits32 = data
    y, dispatch_mask, gates = jitted_moe(kind, None, 5, experts_choice=True)(
        params32, x32, logits32
    )
    kept = np.asarray(dispatch_mask).any(-1)
    want = np_moe(params, x, np.asarray(gates, np.float64), kept)
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5)


def test_ragged_rejects_experts_choice(data):
    params32, x32, logits32 = data[3:]
    routing = experts_choice_routing(logits32, capacity=4)
    with pytest.raises(ValueError, match="dispatch_kind='ragged'"):
        moe_mlp(params32, x32, routing, "ragged")
    with pytest.raises(ValueError, match="accepted"):
        moe_mlp(params32, x32, routing, "scatter")


def test_dispatch_buffers_and_combine(data):
    _, x, logits, _, x32, logits32 = data
    routing = top_k_routing(logits32, 2, capacity=3, batch_priority=True)
    mask = np.asarray(routing.dispatch)
    # Expected buffer: slot (e, c) holds the token that the one-hot mask puts there.
    want = np.einsum("gsec,gsd->gecd", mask.astype(np.float64), x)
    for kind in ("einsum", "indices"):
        np.testing.assert_allclose(np.asarray(dispatch(x32, routing, kind)), want, atol=1e-6)
    y = np.random.default_rng(1).normal(size=(G, E, 3, 5))
    want_combined = np.einsum("gsec,gecd->gsd", np.asarray(routing.combine, np.float64), y)
    for kind in ("einsum", "indices"):
        got = combine(jnp.asarray(y, jnp.float32), routing, kind)
        np.testing.assert_allclose(np.asarray(got), want_combined, atol=1e-5)


def test_dispatcher_gradients_agree(data):
    params32, x32, logits32 = data[3:]
    einsum_grads = dispatcher_grad(params32, x32, logits32, "einsum", 2, 3)
    index_grads = dispatcher_grad(params32, x32, logits32, "indices", 2, 3)
    for a, b in zip(jax.tree.leaves(einsum_grads), jax.tree.leaves(index_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The router learns through the combine weights.
    assert float(jnp.abs(einsum_grads[2]).sum()) > 0


def test_expert_mlp_matches_numpy(data):
    params, _, _, params32, _, _ = data
    x = np.random.default_rng(2).normal(size=(E, 3, D))
    want = np.stack([np_expert(params, e, x[e]) for e in range(E)])
    got = expert_mlp(params32, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
