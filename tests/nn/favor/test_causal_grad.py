"""Gradients of causal FAVOR+: the chunked custom VJP vs autodiff of dense implementations and
vs float64 finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn import favor

B, L, H, D, M = 2, 11, 2, 4, 12
EPS = 1e-6


def dense_core(q, e, c, v):
    """y_i = sum_{j<=i} exp(c_j - c_i) (q_i . e_j) v_j as one masked L x L matrix."""
    lower = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
    exponent = jnp.where(lower[:, :, None], c[:, None] - c[:, :, None], -jnp.inf)  # [B, i, j, H]
    scores = jnp.einsum("bihm,bjhm->bijh", q, e) * jnp.exp(exponent)
    return jnp.einsum("bijh,bjhd->bihd", scores, v), scores.sum(2)


def dense_causal_softmax(q, k, v, w, mask, eps=EPS):
    """Causal FAVOR+ with the running-max key stabiliser, all pairs at once (no chunking)."""
    d = q.shape[-1]
    ratio = w.shape[0] ** -0.5
    qs, ks = q * d**-0.25, k * d**-0.25
    q_logits = jnp.einsum("bihd,md->bihm", qs, w)
    q_half = 0.5 * jnp.sum(qs**2, -1, keepdims=True)
    qf = ratio * (jnp.exp(q_logits - q_half - q_logits.max(-1, keepdims=True)) + eps)
    k_logits = jnp.einsum("bjhd,md->bjhm", ks, w)
    k_half = 0.5 * jnp.sum(ks**2, -1)
    keep = mask[:, :, None]
    running_max = jax.lax.cummax(jnp.where(keep, k_logits.max(-1), -1e30), axis=1)  # [B, L, H]
    allowed = jnp.tril(jnp.ones((q.shape[1],) * 2, bool))[None, :, :, None] & keep[:, None]
    # key j as seen by query i: ratio * (exp(a_j - |k_j|^2/2 - c_i) + eps), zero unless allowed
    exponent = (
        k_logits[:, None] - k_half[:, None, :, :, None] - running_max[:, :, None, :, None]
    )  # [B, i, j, H, M]
    exponent = jnp.where(allowed[..., None], exponent, -jnp.inf)
    kf = ratio * (jnp.exp(exponent) + eps * allowed[..., None])
    scores = jnp.einsum("bihm,bijhm->bijh", qf, kf)
    num = jnp.einsum("bijh,bjhd->bihd", scores, v)
    den = scores.sum(2)
    den = den + 2 * eps * (jnp.abs(den) <= eps)
    return num / den[..., None]


@pytest.fixture(scope="module")
def inputs():
    ks = jax.random.split(jax.random.key(4), 6)
    q, k, v = (jax.random.normal(kk, (B, L, H, D)) for kk in ks[:3])
    w = favor.gaussian_orthogonal_random_matrix(ks[3], M, D)
    mask = jnp.ones((B, L), bool).at[0, 8:].set(False).at[1, :2].set(False)
    return q, k, v, w, mask


def _probe_loss(fn, probe):
    """sum(out * probe) for one output; y and z both probed for the core's (y, z)."""

    def loss(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            y, z = out
            return jnp.sum(y * probe) + jnp.sum(z * probe[..., 0])
        return jnp.sum(out * probe)

    return loss


def _loss_grads(fn, args, probe):
    return jax.jit(jax.grad(_probe_loss(fn, probe), argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("chunk_size", [3, 4, 16])
def test_core_vjp_matches_dense_autodiff(inputs, chunk_size):
    ks = jax.random.split(jax.random.key(8), 5)
    q, e = (jnp.abs(jax.random.normal(kk, (B, L, H, M))) for kk in ks[:2])
    c = jnp.cumsum(jnp.abs(jax.random.normal(ks[2], (B, L, H))), axis=1)
    v = jax.random.normal(ks[3], (B, L, H, D))
    probe = jax.random.normal(ks[4], (B, L, H, D))

    def chunked(q, e, c, v):
        return favor.chunked_causal_linear_attention(q, e, c, v, chunk_size=chunk_size)

    for got, want in zip(chunked(q, e, c, v), dense_core(q, e, c, v)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    got = _loss_grads(chunked, (q, e, c, v), probe)
    want = _loss_grads(dense_core, (q, e, c, v), probe)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


# A large epsilon makes the offsets' (and the query max's) share of the gradient visible: with
# epsilon 1e-6 it is ~1e-6 of the total and any routing error would pass unnoticed.
@pytest.mark.parametrize("eps", [EPS, 0.05])
@pytest.mark.parametrize("implementation", ["scan", "batched"])
def test_softmax_causal_grads_match_dense_autodiff(inputs, implementation, eps):
    q, k, v, w, mask = inputs
    k = k.at[:, 6].multiply(3.0)  # a large key: the running max jumps inside a chunk
    probe = jax.random.normal(jax.random.key(3), v.shape)
    options = dict(causal=True, mask=mask, chunk_size=4, implementation=implementation)

    def chunked(q, k, v, w):
        return favor.favor_attention(q, k, v, w, numerical_stabilizer=eps, **options)

    def dense(q, k, v, w):
        return dense_causal_softmax(q, k, v, w, mask, eps)

    np.testing.assert_allclose(chunked(q, k, v, w), dense(q, k, v, w), rtol=1e-4, atol=1e-5)
    for g, want in zip(
        _loss_grads(chunked, (q, k, v, w), probe), _loss_grads(dense, (q, k, v, w), probe)
    ):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, want, rtol=2e-3, atol=2e-5)


def test_relu_causal_grads_match_dense_autodiff(inputs):
    q, k, v, w, mask = inputs
    probe = jax.random.normal(jax.random.key(6), v.shape)

    def chunked(q, k, v):
        return favor.favor_attention(q, k, v, w, kernel="relu", causal=True, chunk_size=3)

    def dense(q, k, v):
        qf = jax.nn.relu(jnp.einsum("blhd,md->blhm", q, w)) + 1e-3
        kf = jax.nn.relu(jnp.einsum("blhd,md->blhm", k, w)) + 1e-3
        scores = jnp.einsum("bihm,bjhm->bijh", qf, kf) * jnp.tril(jnp.ones((L, L)))[..., None]
        return jnp.einsum("bijh,bjhd->bihd", scores, v) / scores.sum(2)[..., None]

    for g, want in zip(
        _loss_grads(chunked, (q, k, v), probe), _loss_grads(dense, (q, k, v), probe)
    ):
        np.testing.assert_allclose(g, want, rtol=1e-3, atol=1e-5)


def _check_directional_derivatives(fn, args, key, num_directions=3, step=1e-5):
    """<grad f, u> vs the central difference (f(x + h u) - f(x - h u)) / 2h, all args at once."""
    probe = jax.random.normal(key, args[-1].shape, args[-1].dtype)
    loss = jax.jit(_probe_loss(fn, probe))
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    for i in range(num_directions):
        keys = jax.random.split(jax.random.fold_in(key, i), len(args))
        dirs = [jax.random.normal(kk, a.shape, a.dtype) for kk, a in zip(keys, args)]
        plus = loss(*(a + step * u for a, u in zip(args, dirs)))
        minus = loss(*(a - step * u for a, u in zip(args, dirs)))
        numeric = (plus - minus) / (2 * step)
        analytic = sum(jnp.vdot(g, u) for g, u in zip(grads, dirs))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def _causal_eps005(q, k, v, w, implementation, **options):
    """Causal softmax FAVOR+ in chunks of 4 with epsilon 0.05 (large enough that the offsets'
    and the query max's share of the gradient is visible)."""
    return favor.favor_attention(
        q,
        k,
        v,
        w,
        causal=True,
        chunk_size=4,
        numerical_stabilizer=0.05,
        implementation=implementation,
        **options,
    )


def test_grads_match_finite_differences_in_float64(inputs):
    with jax.enable_x64(True):
        q, k, v, w, mask = (np.asarray(x) for x in inputs)
        q, k, v, w = (jnp.asarray(x, jnp.float64) for x in (q, k, v, w))
        mask = jnp.asarray(mask)
        assert q.dtype == jnp.float64

        for implementation in ("scan", "batched"):

            def softmax_causal(q, k, w, v, implementation=implementation):
                return _causal_eps005(q, k, v, w, implementation, mask=mask)

            _check_directional_derivatives(softmax_causal, (q, k, w, v), jax.random.key(0))

        def core(qq, ee, cc, vv):
            return favor.chunked_causal_linear_attention(qq, ee, cc, vv, chunk_size=3)

        c = jnp.cumsum(jnp.abs(q[..., 0]), axis=1)
        args = (jnp.abs(q), jnp.abs(k), c, v)
        _check_directional_derivatives(core, args, jax.random.key(1))


def test_query_max_ties_share_the_gradient_like_jnp_max(inputs):
    """A zero query ties every feature at the max: both implementations split its gradient
    among the tied features (unnormalised output, where that gradient does not cancel)."""
    q, k, v, w, mask = inputs
    q = q.at[0, 3].set(0.0)
    probe = jax.random.normal(jax.random.key(9), v.shape)
    grads = {}
    for implementation in ("scan", "batched"):

        def attend(q, k, v, implementation=implementation):
            return _causal_eps005(q, k, v, w, implementation, renormalize=False)

        grads[implementation] = _loss_grads(attend, (q, k, v), probe)
    for got, want in zip(grads["scan"], grads["batched"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_scan_needs_a_python_stabilizer(inputs):
    q, k, v, w, _ = inputs

    def attend(eps, implementation):
        return favor.favor_attention(
            q, k, v, w, causal=True, numerical_stabilizer=eps, implementation=implementation
        )

    assert jax.jit(attend, static_argnums=1)(0.1, "batched").shape == v.shape
    with pytest.raises(ValueError, match="numerical_stabilizer as a Python number"):
        jax.jit(attend, static_argnums=1)(0.1, "scan")
