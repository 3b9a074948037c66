"""SAM and GSAM gradients against an independent float64 NumPy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab.optim import gsam_gradient, gsam_rho, sam_gradient


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def np_loss_and_grad(p, x, y):
    """Mean squared error of a tanh MLP and its gradient, by hand, in float64."""
    a = x @ p["w1"] + p["b1"]
    h = np.tanh(a)
    out = h @ p["w2"] + p["b2"]
    r = out - y
    n = r.size
    d_out = 2 * r / n
    grads = {"w2": h.T @ d_out, "b2": d_out.sum(0)}
    d_a = (d_out @ p["w2"].T) * (1 - h**2)
    grads.update(w1=x.T @ d_a, b1=d_a.sum(0))
    return float(np.mean(r**2)), grads


def np_gsam(p, x, y, rho, alpha, adaptive, eps=1e-12):
    loss, g = np_loss_and_grad(p, x, y)
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    e = {k: (np.abs(p[k]) if adaptive else 1.0) * rho * g[k] / (norm + eps) for k in p}
    _, gr = np_loss_and_grad({k: p[k] + e[k] for k in p}, x, y)
    gr_norm = np.sqrt(sum(np.sum(v**2) for v in gr.values()))
    u = {k: gr[k] / gr_norm for k in gr} if gr_norm > 0 else {k: 0 * gr[k] for k in gr}
    dot = sum(np.sum(g[k] * u[k]) for k in g)
    return loss, {k: gr[k] - alpha * (g[k] - dot * u[k]) for k in g}


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    p = {
        "w1": rng.normal(size=(4, 6)),
        "b1": rng.normal(size=6) * 0.1,
        "w2": rng.normal(size=(6, 2)) / 2,
        "b2": rng.normal(size=2) * 0.1,
    }
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
    return p, x, y, f32(p), f32(x), f32(y)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_gsam_and_sam_match_numpy(problem, adaptive, alpha):
    p, x, y, p32, x32, y32 = problem
    want_loss, want = np_gsam(p, x, y, rho=0.3, alpha=alpha, adaptive=adaptive)
    loss, grads = jax.jit(
        lambda params: gsam_gradient(
            mlp_loss, params, x32, y32, rho=0.3, alpha=alpha, adaptive=adaptive
        )
    )(p32)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)  # the clean loss
    for k in p:
        np.testing.assert_allclose(grads[k], want[k], rtol=2e-4, atol=1e-6, err_msg=k)
    if alpha == 0.0:
        sam_loss, sam = sam_gradient(mlp_loss, p32, x32, y32, rho=0.3, adaptive=adaptive)
        assert float(sam_loss) == pytest.approx(float(loss), rel=1e-6)
        for k in p:
            np.testing.assert_allclose(sam[k], grads[k], rtol=1e-5, atol=1e-7)


def test_a_zero_gradient_gives_the_clean_gradient_not_nan(problem):
    _, _, _, p32, _, _ = problem
    flat = lambda params: 0.0 * jnp.sum(params["w1"]) + 1.5  # constant: gradient 0
    for fn in (
        lambda: gsam_gradient(flat, p32, rho=0.1, alpha=0.5),
        lambda: sam_gradient(flat, p32, rho=0.1, adaptive=True),
    ):
        loss, grads = fn()
        assert float(loss) == 1.5
        for leaf in jax.tree.leaves(grads):
            assert np.all(np.asarray(leaf) == 0.0)


def test_has_aux_returns_the_clean_calls_aux(problem):
    _, _, _, p32, x32, y32 = problem

    def with_aux(params, x, y):
        return mlp_loss(params, x, y), {"n": jnp.sum(params["b2"])}

    (loss, aux), grads = sam_gradient(with_aux, p32, x32, y32, rho=0.1, has_aux=True)
    assert float(aux["n"]) == pytest.approx(float(jnp.sum(p32["b2"])))
    assert float(loss) == pytest.approx(float(mlp_loss(p32, x32, y32)))
    assert set(grads) == set(p32)


def test_rho_follows_the_learning_rate():
    kw = dict(rho_max=0.6, rho_min=0.1, lr_max=1e-3, lr_min=1e-5)
    for lr in (1e-5, 5e-4, 1e-3):
        want = 0.1 + 0.5 * (lr - 1e-5) / (1e-3 - 1e-5)
        assert float(gsam_rho(lr, **kw)) == pytest.approx(want, rel=1e-6)
    assert float(
        gsam_rho(3e-4, rho_max=0.6, rho_min=0.1, lr_max=0.01, lr_min=0.01)
    ) == pytest.approx(0.6)
