"""VDM module: score network, loss wiring, variance gradient, evaluation, samplers, training."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlab.models import vdm

TINY = vdm.vdm_preset("digits", width=8, depth=0, groups=4, dropout=0.1)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.round(data.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return x, data.target.astype(np.int32)


@jax.jit
def _perturbed(params, key, scale):
    def move(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if "kernel" not in names or "schedule" in names:
            return leaf
        sub = jax.random.fold_in(key, len(jax.tree_util.keystr(path)) * 7919 + leaf.size)
        return leaf + scale * jax.random.normal(sub, leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(move, params)


def perturb(model, seed, scale=0.05):
    """Moves every network kernel (zero-initialised ones included) by N(0, scale^2)."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, _perturbed(params, jax.random.key(seed), scale))


@pytest.fixture(scope="module")
def tiny_model():
    return vdm.VDM(TINY, rngs=nnx.Rngs(0))


def test_presets_and_validation():
    ref = vdm.vdm_preset("cifar10")
    assert (ref.width, ref.depth, ref.dropout, ref.attention) == (128, 32, 0.1, False)
    assert (ref.fourier, ref.schedule, ref.timesteps) == (True, "learned_scalar", 0)
    assert (ref.gamma_min, ref.gamma_max, ref.image_shape) == (-13.3, 5.0, (32, 32, 3))
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        vdm.VDMConfig(schedule="cosine")
    with pytest.raises(ValueError, match="dtype"):
        vdm.VDMConfig(dtype="float16")
    with pytest.raises(ValueError, match="unknown VDM preset"):
        vdm.vdm_preset("mnist")
    with pytest.raises(ValueError, match="divisible"):
        vdm.VDM(dataclasses.replace(TINY, width=10), rngs=nnx.Rngs(0))


score_fn = nnx.jit(lambda model, z, g: model.score(z, g))
loss_fn_det = nnx.jit(lambda model, x, key: model.loss(x, None, key, deterministic=True))


def test_score_net_starts_at_base_measure(tiny_model):
    z = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    out = score_fn(tiny_model, z, jnp.array([-13.0, 0.0, 5.0]))
    assert out.shape == z.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(z))


def test_bf16_keeps_float32_output_and_tracks_float32():
    cfg = dataclasses.replace(TINY, attention=True, depth=1)
    nets = {}
    for dtype in ("float32", "bfloat16"):
        model = vdm.VDM(dataclasses.replace(cfg, dtype=dtype), rngs=nnx.Rngs(0))
        perturb(model, 0)  # so that the network is not the identity
        nets[dtype] = model
    z = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    g = jnp.array([-5.0, 2.0])
    out32 = score_fn(nets["float32"], z, g)
    out16 = score_fn(nets["bfloat16"], z, g)
    assert out16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out32 - z))) > 1e-2
    scale = float(jnp.max(jnp.abs(out32 - z)))
    assert float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * scale + 0.05


def test_loss_metrics_and_batch_49(tiny_model, digits):
    x = digits[0][:49]
    loss, metrics = loss_fn_det(tiny_model, x, jax.random.key(0))
    total = metrics["bpd_recon"] + metrics["bpd_prior"] + metrics["bpd_diff"]
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    assert float(metrics["gamma_0"]) == pytest.approx(-13.3)
    assert float(metrics["schedule_mid"]) == pytest.approx(0.5)  # nu(1/2) of a linear schedule
    again, _ = loss_fn_det(tiny_model, x, jax.random.key(0))
    assert float(again) == float(loss)
    via_rngs, _ = loss_fn_det(tiny_model, x, nnx.Rngs(dropout=0))
    assert np.isfinite(float(via_rngs))
    with pytest.raises(ValueError, match="streams"):
        tiny_model.loss(x, None, nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 1\]"):
        tiny_model.loss(np.zeros((2, 4, 4, 1), np.uint8), None, jax.random.key(0))


@pytest.mark.parametrize("schedule,timesteps", [("fixed", 0), ("learned_scalar", 10)])
def test_fixed_and_discrete_models_run(schedule, timesteps, digits):
    model = vdm.VDM(
        dataclasses.replace(TINY, schedule=schedule, timesteps=timesteps), rngs=nnx.Rngs(0)
    )
    losses = nnx.jit(
        lambda m, x: m.per_example_losses(
            x, None, jax.random.key(0), deterministic=True, times=jnp.full(4, 0.55)
        )
    )
    recon, prior, diff = losses(model, digits[0][:4])
    assert recon.shape == prior.shape == diff.shape == (4,)
    assert np.all(np.isfinite(np.asarray(diff))) and np.all(np.asarray(diff) > 0)


class _ToyScore(nnx.Module):
    """A cheap stand-in for the U-Net with the same call signature: depends on z and gamma."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(2, 64, rngs=rngs)

    def __call__(self, z, gamma_t, labels=None, *, dropout_key=None):
        feats = jnp.stack([jnp.sin(gamma_t), jnp.cos(0.3 * gamma_t)], axis=1)
        return z * (1.0 + jnp.tanh(self.dense(feats)).reshape(z.shape))


def test_variance_gradient_in_model(digits):
    """Shape parameters get grad of mean((s L_i)^2); endpoints and network get grad of the VLB."""
    cfg = dataclasses.replace(TINY, schedule="learned_net", schedule_features=8, dropout=0.0)
    with_var = nnx.eval_shape(lambda: vdm.VDM(cfg, rngs=nnx.Rngs(3)))
    with_var.schedule = vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(3), features=8)
    with_var.score = _ToyScore(nnx.Rngs(4))
    for layer in (with_var.schedule.l2, with_var.schedule.l3):  # a non-linear shape
        layer.kernel[...] = 30.0 * layer.kernel[...]
    with_var.schedule.l2.bias[...] = jnp.linspace(-1.0, 5.0, 8)  # asymmetric about t = 1/2
    with_var.schedule.l1.kernel[...] = jnp.full((1, 1), 0.05)  # the linear part small
    plain = nnx.eval_shape(lambda: vdm.VDM(cfg, rngs=nnx.Rngs(3)))
    plain.config = dataclasses.replace(cfg, variance_gradient=False)
    plain.schedule = vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(3), features=8)
    plain.score = _ToyScore(nnx.Rngs(4))
    nnx.update(plain, nnx.state(with_var))
    x = digits[0][:6]
    key = jax.random.key(4)
    s = 1.0 / (cfg.num_dims * math.log(2.0))

    def per_example_fn(model):
        gd, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p):
            m = nnx.merge(gd, p, rest)
            return m.per_example_losses(x, None, key, deterministic=True)[2]

        return f, params

    @jax.jit
    def variance_grads(params):
        return jax.grad(lambda p: jnp.mean(s * f_var(p)))(params)

    @jax.jit
    def plain_grads(params):
        diff, pullback = jax.vjp(f_plain, params)
        n = diff.shape[0]
        (vlb,) = pullback(jnp.full_like(diff, s / n))
        (second_moment,) = pullback(2 * s * s * diff / n)  # grad of mean((s L)^2)
        return vlb, second_moment

    # The logged shape at mid-time is this schedule's, not the linear 0.5.
    metrics = nnx.jit(lambda m: m.loss(x, None, key, deterministic=True)[1])(with_var)
    raw = np.asarray(with_var.schedule.raw(jnp.array([0.0, 0.5, 1.0])), np.float64)
    want_mid = (raw[1] - raw[0]) / (raw[2] - raw[0])
    assert abs(want_mid - 0.5) > 0.02
    np.testing.assert_allclose(float(metrics["schedule_mid"]), want_mid, rtol=1e-4)
    f_var, params = per_example_fn(with_var)
    f_plain, _ = per_example_fn(plain)
    g_var = variance_grads(params)
    g_vlb, g_sq = plain_grads(params)
    for layer in ("l1", "l2", "l3"):
        got = np.asarray(g_var["schedule"][layer]["kernel"][...])
        want = np.asarray(g_sq["schedule"][layer]["kernel"][...])
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=3e-4 * np.abs(want).max())
    for name in ("b", "w"):
        np.testing.assert_allclose(
            np.asarray(g_var["schedule"][name][...]),
            np.asarray(g_vlb["schedule"][name][...]),
            rtol=1e-4,
        )
    got = np.asarray(g_var["score"]["dense"]["kernel"][...])
    want = np.asarray(g_vlb["score"]["dense"]["kernel"][...])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=3e-4 * np.abs(want).max())


def test_evaluate_bpd_and_interval(tiny_model, digits):
    x = digits[0][:5]
    out = nnx.jit(lambda m, x: vdm.evaluate_bpd(m, x, None, jax.random.key(0), num_draws=3))(
        tiny_model, x
    )
    assert out["bpd"].shape == (5,)
    np.testing.assert_allclose(
        np.asarray(out["bpd"]),
        np.asarray(out["bpd_recon"] + out["bpd_prior"] + out["bpd_diff"]),
        rtol=1e-6,
    )
    sums = nnx.jit(lambda m, x: vdm.evaluation_sums(m, x, None, jax.random.key(0), 3))(
        tiny_model, x
    )
    np.testing.assert_allclose(float(sums["bpd_sum"]), float(out["bpd"].sum()), rtol=1e-5)
    np.testing.assert_allclose(float(sums["bpd_sq_sum"]), float((out["bpd"] ** 2).sum()), rtol=1e-5)
    assert float(sums["count"]) == 5
    vals = np.array([1.0, 2.0, 4.0])
    mean, half = vdm.bpd_confidence_interval(vals.sum(), (vals**2).sum(), 3)
    assert mean == pytest.approx(vals.mean())
    assert half == pytest.approx(1.96 * vals.std(ddof=1) / math.sqrt(3))
    with pytest.raises(ValueError, match="num_draws"):
        vdm.evaluate_bpd(tiny_model, x, None, jax.random.key(0), num_draws=0)


def test_samplers(tiny_model):
    a = vdm.sample(tiny_model, jax.random.key(0), 3, 4)
    b = vdm.sample(tiny_model, jax.random.key(0), 3, 4)
    assert a.shape == (3, 8, 8, 1) and a.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = vdm.sample(tiny_model, jax.random.key(1), 3, 4, sampler="ddim")
    assert c.shape == (3, 8, 8, 1) and c.dtype == jnp.uint8
    grid = vdm.image_grid(np.asarray(a), columns=2)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[10:18, 1:9], np.asarray(a)[2])
    assert grid[10:18, 10:18].max() == 0  # the empty fourth cell
    with pytest.raises(ValueError, match="ancestral"):
        vdm.sample(tiny_model, jax.random.key(0), 3, 4, sampler="euler")


def test_conditional_guided_sampling(digits):
    cfg = dataclasses.replace(TINY, num_classes=10)
    model = vdm.VDM(cfg, rngs=nnx.Rngs(0))
    x, y = digits[0][:4], digits[1][:4]
    loss, _ = nnx.jit(lambda m: m.loss(x, y, jax.random.key(0), deterministic=False))(model)
    assert np.isfinite(float(loss))
    out = vdm.sample(model, jax.random.key(0), 4, 3, guidance=1.5, labels=y)
    assert out.shape == (4, 8, 8, 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        vdm.sample(model, jax.random.key(0), 4, 3, labels=y[:2])


def test_training_on_digits_decreases_loss(digits):
    x_all = digits[0]
    cfg = dataclasses.replace(TINY, dropout=0.0)
    model = vdm.VDM(cfg, rngs=nnx.Rngs(0))
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(3e-3, b2=0.99, weight_decay=0.01, mask=vdm.weight_decay_mask(params))
    opt_state = tx.init(params)
    eval_x = x_all[-256:]

    def loss_fn(p, x, key, deterministic):
        return nnx.merge(gd, p, rest).loss(x, None, key, deterministic=deterministic)[0]

    @jax.jit
    def step(p, o, x, key):
        loss, g = jax.value_and_grad(loss_fn)(p, x, key, False)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    evaluate = jax.jit(lambda p: loss_fn(p, eval_x, jax.random.key(100), True))
    before = float(evaluate(params))
    rng = np.random.default_rng(0)
    for i in range(30):
        batch = x_all[rng.integers(0, 1600, 64)]
        params, opt_state, _ = step(params, opt_state, batch, jax.random.key(i))
    after = float(evaluate(params))
    assert after < before - 1.0, (before, after)


def test_probability_flow_density_of_base_measure(tiny_model, digits):
    """With eps_hat = z (untrained network) the ODE is linear: dz/dt = a(t) z with
    a = gamma' (sigma - sigma^2) / 2, so log p_0(z) = log N(z e^A) + D A, A = int_0^1 a."""
    from scipy.integrate import quad

    z0 = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), np.float64)
    got = nnx.jit(lambda m, z: vdm.ode_log_density(m, z, jax.random.key(1), steps=16))(
        tiny_model, jnp.asarray(z0, jnp.float32)
    )

    def a(t):
        sigma = math.sqrt(1 / (1 + math.exp(-(-13.3 + 18.3 * t))))
        return 0.5 * 18.3 * (sigma - sigma**2)

    big_a = quad(a, 0, 1, limit=200)[0]
    z1 = z0 * math.exp(big_a)
    want = -0.5 * (z1**2).reshape(2, -1).sum(1) - 32 * math.log(2 * math.pi) + 64 * big_a
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
    out = nnx.jit(lambda m, x: vdm.probability_flow_bpd(m, x, None, jax.random.key(2), steps=4))(
        tiny_model, digits[0][:3]
    )
    scale = 1 / (64 * math.log(2))
    np.testing.assert_allclose(
        np.asarray(out["bpd"]),
        np.asarray(out["bpd_recon"] + (out["log_q_z0"] - out["log_p_z0"]) * scale),
        rtol=1e-5,
    )
    assert np.all(np.asarray(out["bpd"]) > 0)
