"""FAVOR+ feature maps and attention vs independent float64 NumPy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.nn import favor

B, L, H, D = 2, 13, 2, 8
M = 24


# ----------------------------------------------------------------------------- NumPy references


def np_softmax_features(x, w, is_query, eps=1e-6, mask=None):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    d = x.shape[-1]
    xs = x / d**0.25
    logits = np.einsum("blhd,md->blhm", xs, w)
    half = 0.5 * np.sum(xs**2, axis=-1, keepdims=True)
    if is_query:
        offset = logits.max(axis=-1, keepdims=True)
    else:
        per_token = logits.max(axis=-1)  # [B, L, H]
        if mask is not None:
            per_token = np.where(mask[:, :, None], per_token, -np.inf)
        offset = per_token.max(axis=1)[:, None, :, None]
    feats = (np.exp(logits - half - offset) + eps) / np.sqrt(w.shape[0])
    if mask is not None and not is_query:
        feats = feats * mask[:, :, None, None]
    return feats


def np_relu_features(x, w=None, eps=1e-3, fn=lambda z: np.maximum(z, 0.0), mask=None):
    x = np.asarray(x, np.float64)
    z = x if w is None else np.einsum("blhd,md->blhm", x, np.asarray(w, np.float64))
    feats = fn(z) + eps
    if mask is not None:
        feats = feats * mask[:, :, None, None]
    return feats


def np_finish(num, den, s, renormalize):
    if not renormalize:
        return num
    den = den + 2 * s * (np.abs(den) <= s)
    return num / den[..., None]


def np_bidirectional(q, k, v, w, kernel="softmax", s=1e-6, mask=None, renormalize=True):
    if kernel == "softmax":
        qf, kf = np_softmax_features(q, w, True, s), np_softmax_features(k, w, False, s, mask)
    else:
        qf, kf = np_relu_features(q, w), np_relu_features(k, w, mask=mask)
    v = np.asarray(v, np.float64)
    num = np.einsum("bihm,bjhm,bjhd->bihd", qf, kf, v)
    den = np.einsum("bihm,bjhm->bih", qf, kf)
    return np_finish(num, den, s, renormalize)


def np_causal_reference_style(q, k, v, w, s=1e-6):
    """The reference's causal formula: key stabiliser = max over ALL positions (leaks)."""
    qf, kf = np_softmax_features(q, w, True, s), np_softmax_features(k, w, False, s)
    scores = np.einsum("bihm,bjhm->bhij", qf, kf) * np.tril(np.ones((q.shape[1],) * 2))
    num = np.einsum("bhij,bjhd->bihd", scores, np.asarray(v, np.float64))
    den = np.einsum("bhij->bih", scores)
    return np_finish(num, den, s, True)


def np_causal_running_max(q, k, v, w, s=1e-6, mask=None, renormalize=True):
    """flaxlab's causal definition, written per query with explicit loops."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    b_, l_, h_, d_ = q.shape
    mask = np.ones((b_, l_), bool) if mask is None else np.asarray(mask)
    qf = np_softmax_features(q, w, True, s)
    ks = k / d_**0.25
    logits = np.einsum("blhd,md->blhm", ks, w)
    half = 0.5 * np.sum(ks**2, axis=-1)
    out = np.zeros(v.shape)
    for b in range(b_):
        for h in range(h_):
            for i in range(l_):
                valid = [j for j in range(i + 1) if mask[b, j]]
                if not valid:
                    continue
                c_i = max(logits[b, j, h].max() for j in valid)
                num, den = np.zeros(v.shape[-1]), 0.0
                for j in valid:
                    kf = (np.exp(logits[b, j, h] - half[b, j, h] - c_i) + s) / np.sqrt(w.shape[0])
                    a = qf[b, i, h] @ kf
                    num += a * v[b, j, h]
                    den += a
                out[b, i, h] = np_finish(num, np.array(den), s, renormalize)
    return out


def np_causal_relu(q, k, v, w=None, mask=None, s=1e-6):
    qf, kf = np_relu_features(q, w), np_relu_features(k, w, mask=mask)
    scores = np.einsum("bihm,bjhm->bhij", qf, kf) * np.tril(np.ones((q.shape[1],) * 2))
    num = np.einsum("bhij,bjhd->bihd", scores, np.asarray(v, np.float64))
    return np_finish(num, np.einsum("bhij->bih", scores), s, True)


def np_exact_attention(q, k, v, causal):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v)


# ----------------------------------------------------------------------------- fixtures


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


attend = jax.jit(
    favor.favor_attention,
    static_argnames=(
        "kernel",
        "causal",
        "numerical_stabilizer",
        "renormalize",
        "chunk_size",
        "implementation",
    ),
)


# ----------------------------------------------------------------------------- projections


@pytest.mark.parametrize("num_features,dim", [(24, 8), (20, 8), (5, 8)])
def test_orthogonal_rows_within_blocks(num_features, dim):
    w = np.asarray(
        favor.gaussian_orthogonal_random_matrix(jax.random.key(3), num_features, dim, scaling=1),
        np.float64,
    )
    assert w.shape == (num_features, dim)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), np.sqrt(dim), rtol=1e-5)
    for start in range(0, num_features, dim):
        block = w[start : start + dim] / np.sqrt(dim)
        np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-5)
    # Different blocks are independent draws, not orthogonal to each other.
    if num_features > dim:
        assert np.abs(w[:dim] @ w[dim : 2 * dim].T).max() > 1e-2


def test_orthogonal_scaling_zero_uses_chi_norms_of_the_key():
    key = jax.random.key(11)
    w = np.asarray(favor.gaussian_orthogonal_random_matrix(key, 20, 8, scaling=0), np.float64)
    expected = np.linalg.norm(np.asarray(jax.random.normal(key, (20, 8)), np.float64), axis=1)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), expected, rtol=1e-5)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(unit[:8] @ unit[:8].T, np.eye(8), atol=1e-5)


def test_iid_and_draw_projection():
    key = jax.random.key(2)
    np.testing.assert_array_equal(
        favor.gaussian_random_matrix(key, 6, 4), jax.random.normal(key, (6, 4))
    )
    np.testing.assert_array_equal(
        favor.draw_projection(key, 6, 4, "iid"), favor.gaussian_random_matrix(key, 6, 4)
    )
    np.testing.assert_array_equal(
        favor.draw_projection(key, 6, 4, "orthogonal"),
        favor.gaussian_orthogonal_random_matrix(key, 6, 4),
    )
    assert favor.draw_projection(key, 6, 4, "deterministic") is None
    with pytest.raises(ValueError, match="feature_type"):
        favor.draw_projection(key, 6, 4, "fourier")
    with pytest.raises(ValueError, match="scaling"):
        favor.gaussian_orthogonal_random_matrix(key, 6, 4, scaling=2)
    with pytest.raises(ValueError, match="num_features"):
        favor.gaussian_random_matrix(key, 0, 4)


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("is_query", [True, False])
def test_softmax_features_match_numpy(qkv, proj, mask, is_query):
    x = qkv[0]
    got = favor.softmax_kernel_features(x, proj, is_query=is_query)
    np.testing.assert_allclose(got, np_softmax_features(x, proj, is_query), rtol=2e-5, atol=1e-9)
    if not is_query:
        got = favor.softmax_kernel_features(x, proj, is_query=False, mask=mask)
        want = np_softmax_features(x, proj, False, mask=np.asarray(mask))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
        # Padding content must not move the features of valid keys.
        noisy = jnp.where(mask[:, :, None, None], x, 50.0)
        np.testing.assert_allclose(
            favor.softmax_kernel_features(noisy, proj, is_query=False, mask=mask), got, rtol=1e-6
        )


def test_relu_features_match_numpy(qkv, proj, mask):
    x = qkv[1]
    np.testing.assert_allclose(favor.relu_kernel_features(x), np_relu_features(x), rtol=1e-6)
    np.testing.assert_allclose(
        favor.relu_kernel_features(x, proj, mask=mask),
        np_relu_features(x, proj, mask=np.asarray(mask)),
        rtol=1e-5,
        atol=1e-7,
    )
    got = favor.relu_kernel_features(x, proj, epsilon=0.1, kernel_fn=jnp.square)
    np.testing.assert_allclose(got, np_relu_features(x, proj, 0.1, np.square), rtol=1e-5)


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


def test_benchmark_reference_scan_matches_the_reference_formula(qkv, proj):
    """The benchmark's re-implementation of the reference's per-token scan computes the
    reference's (leaky, global-max) causal formula, so its timings compare like with like."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "favor.py"
    spec = importlib.util.spec_from_file_location("favor_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    q, k, v = qkv
    got = jax.jit(bench.reference_scan_causal)(q, k, v, proj)
    np.testing.assert_allclose(got, np_causal_reference_style(q, k, v, proj), rtol=1e-4, atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(bench.reference_scan_causal(*a, proj) ** 2)))(
        q, k, v
    )
    assert np.all(np.isfinite(grads))
