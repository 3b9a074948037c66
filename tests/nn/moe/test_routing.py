"""Routing and auxiliary losses of flaxlab.nn.moe.routing vs float64 NumPy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlab.nn.moe.routing import (
    compute_capacity,
    experts_choice_routing,
    gshard_loss,
    importance_loss,
    load_loss,
    top_k_routing,
)
from tests.reference import transformer as ref

# ---------------------------------------------------------------- NumPy references (float64)


np_softmax = ref.softmax


def np_top_k_routing(gates, k, capacity, batch_priority):
    """Greedy queueing: all first choices (in priority order), then all second choices..."""
    num_groups, num_tokens, num_experts = gates.shape
    dispatch = np.zeros((num_groups, num_tokens, num_experts, capacity), bool)
    combine = np.zeros(dispatch.shape)
    for g in range(num_groups):
        choices = np.argsort(-gates[g], axis=-1, kind="stable")[:, :k]
        if batch_priority:
            token_order = np.argsort(-gates[g].max(-1), kind="stable")
        else:
            token_order = np.arange(num_tokens)
        filled = np.zeros(num_experts, int)
        for j in range(k):
            for s in token_order:
                e = choices[s, j]
                if filled[e] < capacity:
                    dispatch[g, s, e, filled[e]] = True
                    combine[g, s, e, filled[e]] = gates[g, s, e]
                filled[e] += 1
    return dispatch, combine


def np_cv2(v):
    return (v.std(-1) / v.mean(-1)) ** 2


def np_importance(clean_gates):
    return np_cv2(clean_gates.sum(1))


def np_load(logits, noisy_logits, noise_scale, k):
    threshold = np.sort(noisy_logits, axis=-1)[..., -k]
    p = 1 - scipy.stats.norm.cdf((threshold[..., None] - logits) / noise_scale)
    return np_cv2(p.mean(1))


def np_gshard(gates):
    num_experts = gates.shape[-1]
    top1 = np.eye(num_experts)[gates.argmax(-1)].mean(1)
    return num_experts**2 * (top1 * gates.mean(1)).mean(-1)


def np_experts_choice(gates, capacity):
    num_groups, num_tokens, num_experts = gates.shape
    dispatch = np.zeros((num_groups, num_tokens, num_experts, capacity), bool)
    for g in range(num_groups):
        for e in range(num_experts):
            for c, s in enumerate(np.argsort(-gates[g, :, e], kind="stable")[:capacity]):
                dispatch[g, s, e, c] = True
    return dispatch, dispatch * gates[..., None]


def random_logits(seed, shape, scale=2.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# ---------------------------------------------------------------- capacity


def test_compute_capacity_formula():
    # ceil(S K cf / E) rounded up to a multiple of 4.
    assert compute_capacity(10 * 2, 4, 1.0) == 8  # ceil(5) -> 8
    assert compute_capacity(16 * 2, 8, 1.0) == 4
    assert compute_capacity(16 * 2, 8, 1.25) == 8  # ceil(5) -> 8
    assert compute_capacity(16 * 2, 8, 1.25, multiple_of=None) == 5
    assert compute_capacity(7, 3, 0.5, multiple_of=1) == math.ceil(7 * 0.5 / 3)
    r = top_k_routing(jnp.zeros((1, 10, 4)), 2, capacity_factor=1.0)
    assert r.capacity == 8 and r.dispatch.shape == (1, 10, 4, 8)
    assert top_k_routing(jnp.zeros((1, 10, 4)), 2, capacity=3).capacity == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of capacity and capacity_factor"),
        (dict(capacity=2, capacity_factor=1.0), "exactly one"),
        (dict(capacity=0), "capacity=0"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
        (dict(capacity=2, noise_std=1.0), "noise"),
        (dict(capacity=2, noise_std=1.0, noise=jnp.zeros((1, 2, 4))), "shape"),
    ],
)
def test_top_k_routing_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        top_k_routing(jnp.zeros((1, 4, 4)), 2, **kwargs)


def test_routing_rejects_bad_k_and_rank():
    with pytest.raises(ValueError, match="num_selected_experts=5"):
        top_k_routing(jnp.zeros((1, 4, 4)), 5, capacity=2)
    with pytest.raises(ValueError, match="shape"):
        top_k_routing(jnp.zeros((4, 4)), 1, capacity=2)
    with pytest.raises(ValueError, match="exceeds the 4 tokens"):
        experts_choice_routing(jnp.zeros((1, 4, 2)), capacity_factor=4.0)


# ---------------------------------------------------------------- top-k routing


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("capacity", [2, 3, 40])  # binding, binding, never binding
def test_top_k_routing_matches_numpy(k, batch_priority, capacity):
    logits = random_logits(k + 7 * capacity, (3, 12, 5))
    r = top_k_routing(jnp.asarray(logits), k, capacity=capacity, batch_priority=batch_priority)
    gates = np_softmax(logits.astype(np.float64))
    want_dispatch, want_combine = np_top_k_routing(gates, k, capacity, batch_priority)
    np.testing.assert_array_equal(np.asarray(r.dispatch), want_dispatch)
    np.testing.assert_allclose(np.asarray(r.combine), want_combine, atol=1e-6)
    if capacity < 12:  # the capacity really binds somewhere in these draws
        assert not want_dispatch.any(-1).sum(-1).min() == k
    # The compact form agrees with the one-hot form.
    kept = np.asarray(r.valid).sum()
    assert kept == want_dispatch.sum()
    np.testing.assert_allclose(np.asarray(r.weight), -np.sort(-gates, -1)[..., :k], atol=1e-6)


def test_batch_priority_changes_which_tokens_survive():
    # Every token prefers expert 0, capacity 1; token 3 is the most confident.
    logits = jnp.asarray([[[1.0, 0.0], [1.5, 0.0], [0.5, 0.0], [4.0, 0.0]]])
    vanilla = top_k_routing(logits, 1, capacity=1)
    bpr = top_k_routing(logits, 1, capacity=1, batch_priority=True)
    np.testing.assert_array_equal(vanilla.valid[0, :, 0], [True, False, False, False])
    np.testing.assert_array_equal(bpr.valid[0, :, 0], [False, False, False, True])
    # Dropped weights are not renormalised: the dropped tokens combine to nothing.
    np.testing.assert_array_equal(np.asarray(bpr.combine).sum((2, 3))[0, :3], 0.0)


def test_second_choices_queue_after_all_first_choices():
    # Token 0 picks (0, 1); token 1 picks (1, 0); capacity 1: both first choices win.
    logits = jnp.asarray([[[2.0, 1.0], [1.0, 2.0]]])
    r = top_k_routing(logits, 2, capacity=1)
    np.testing.assert_array_equal(r.position[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(r.valid[0], [[True, False], [True, False]])


def test_noise_tensor_and_rng():
    logits = random_logits(3, (2, 8, 4))
    noise = np.random.default_rng(4).normal(size=logits.shape).astype(np.float32)
    r = top_k_routing(jnp.asarray(logits), 2, capacity=4, noise_std=2.0, noise=jnp.asarray(noise))
    noisy = logits.astype(np.float64) + 2.0 / 4 * noise
    gates = np_softmax(noisy)
    want_dispatch, want_combine = np_top_k_routing(gates, 2, 4, False)
    np.testing.assert_allclose(np.asarray(r.gates), gates, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.dispatch), want_dispatch)
    np.testing.assert_allclose(np.asarray(r.combine), want_combine, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(r.load_loss), np_load(logits.astype(np.float64), noisy, 0.5, 2), rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(r.gshard_loss), np_gshard(gates), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(r.importance_loss),
        np_importance(np_softmax(logits.astype(np.float64))),
        rtol=1e-4,
    )
    # An rng draws standard-normal noise of the logits' shape.
    key = jax.random.key(5)
    from_key = top_k_routing(jnp.asarray(logits), 2, capacity=4, noise_std=2.0, rng=key)
    from_tensor = top_k_routing(
        jnp.asarray(logits),
        2,
        capacity=4,
        noise_std=2.0,
        noise=jax.random.normal(key, logits.shape),
    )
    np.testing.assert_array_equal(from_key.gates, from_tensor.gates)


def test_no_noise_no_load_loss():
    r = top_k_routing(jnp.asarray(random_logits(0, (2, 8, 4))), 2, capacity=4)
    assert r.load_loss is None


# ---------------------------------------------------------------- auxiliary losses


@pytest.mark.parametrize("k", [1, 2])
def test_auxiliary_losses_match_numpy(k):
    logits = random_logits(11, (3, 16, 6)).astype(np.float64)
    noisy = logits + 0.3 * np.random.default_rng(12).normal(size=logits.shape)
    gates = np_softmax(logits)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(importance_loss(f32(gates)), np_importance(gates), rtol=1e-4)
    np.testing.assert_allclose(gshard_loss(f32(gates)), np_gshard(gates), rtol=1e-5)
    np.testing.assert_allclose(
        load_loss(f32(logits), f32(noisy), 0.3, k), np_load(logits, noisy, 0.3, k), rtol=1e-4
    )
    # Perfect balance: importance 0, gshard 1.
    uniform = jnp.full((1, 6, 3), 1 / 3)
    np.testing.assert_allclose(importance_loss(uniform), 0.0, atol=1e-7)
    balanced = jnp.asarray(np_softmax(np.tile(np.eye(3) * 5, (2, 1))[None]), jnp.float32)
    np.testing.assert_allclose(gshard_loss(balanced), 1.0, rtol=1e-5)


def test_load_loss_gradient_flows_to_clean_logits():
    logits = jnp.asarray(random_logits(2, (1, 8, 4)))
    noise = jnp.asarray(np.random.default_rng(3).normal(size=(1, 8, 4)), jnp.float32)

    def total(z):
        return top_k_routing(z, 2, capacity=4, noise_std=1.0, noise=noise).load_loss.sum()

    assert float(jnp.abs(jax.jit(jax.grad(total))(logits)).sum()) > 0


# ---------------------------------------------------------------- experts choice


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_experts_choice_matches_numpy(capacity):
    logits = random_logits(capacity, (2, 8, 3))
    r = experts_choice_routing(jnp.asarray(logits), capacity=capacity)
    want_dispatch, want_combine = np_experts_choice(np_softmax(logits.astype(np.float64)), capacity)
    np.testing.assert_array_equal(np.asarray(r.dispatch), want_dispatch)
    np.testing.assert_allclose(np.asarray(r.combine), want_combine, atol=1e-6)
    assert experts_choice_routing(jnp.asarray(logits), capacity_factor=1.0).capacity == 4


# ---------------------------------------------------------------- properties


# A few static configurations (k, capacity, batch_priority, noise_std), each compiled once;
# hypothesis varies the logits: scale, and rounding to integers to create ties.
PROPERTY_CONFIGS = [(1, 1, False, 0.0), (2, 2, True, 0.0), (2, 3, False, 1.0), (3, 2, True, 1.0)]
PROPERTY_SHAPE = (2, 9, 4)


@functools.cache
def jitted_routing(k, capacity, batch_priority, noise_std):
    return jax.jit(
        lambda z, key: top_k_routing(
            z, k, capacity=capacity, batch_priority=batch_priority, noise_std=noise_std, rng=key
        )
    )


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    config=st.sampled_from(PROPERTY_CONFIGS),
    scale=st.floats(0.01, 20.0),
    ties=st.booleans(),
)
def test_top_k_routing_properties(seed, config, scale, ties):
    k, capacity, batch_priority, noise_std = config
    logits = random_logits(seed, PROPERTY_SHAPE, scale)
    if ties:
        logits = np.round(logits)
    r = jitted_routing(*config)(jnp.asarray(logits), jax.random.key(seed))
    dispatch, combine = np.asarray(r.dispatch), np.asarray(r.combine)
    # Every slot holds at most one token, and the filled slots of an expert are 0..n-1.
    per_slot = dispatch.sum(1)
    assert per_slot.max() <= 1
    filled = per_slot.sum(-1)
    assert filled.max() <= capacity
    np.testing.assert_array_equal(per_slot, np.arange(capacity) < filled[..., None])
    # At most k experts per token, each in at most one slot.
    assert dispatch.sum((2, 3)).max() <= k
    assert dispatch.sum(3).max() <= 1
    # Combine weights are gates in [0, 1], positive exactly where dispatched (and the gate has
    # not underflowed to 0, which large logit scales produce).
    assert combine.min() >= 0 and combine.max() <= 1
    gates = np.asarray(r.gates)[..., None]
    np.testing.assert_array_equal(combine > 0, dispatch & (gates > 0))
    np.testing.assert_array_equal(combine, np.where(dispatch, gates, 0))
    # Per token, the kept weights never exceed 1 (no renormalisation upward).
    assert combine.sum((2, 3)).max() <= 1 + 1e-6
    # Without noise the one-hot form equals the float64 greedy reference.
    if noise_std == 0:
        want, _ = np_top_k_routing(np.asarray(r.gates, np.float64), k, capacity, batch_priority)
        np.testing.assert_array_equal(dispatch, want)
