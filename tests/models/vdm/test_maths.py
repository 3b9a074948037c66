"""VDM pure maths and schedules vs independent float64 NumPy implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlab.models import vdm


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_encode(x):
    return 2.0 * (x.astype(np.float64) + 0.5) / 256.0 - 1.0


def np_logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_reconstruction(x, eps, g0):
    f = np_encode(x)
    z = f + math.exp(g0 / 2) * eps.astype(np.float64)
    centres = np_encode(np.arange(256))
    logits = -0.5 * (z[..., None] - centres) ** 2 / math.exp(g0)
    logp = logits - np_logsumexp(logits, -1)[..., None]
    picked = np.take_along_axis(logp, x.astype(np.int64)[..., None], -1)[..., 0]
    return -picked.reshape(x.shape[0], -1).sum(1)


def np_prior(x, g1):
    f = np_encode(x)
    var = np_sigmoid(g1)
    kl = 0.5 * ((1 - var) * f**2 + var - np.log(var) - 1)
    return kl.reshape(x.shape[0], -1).sum(1)


def images(batch, seed, shape=(4, 4, 3)):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch, *shape)).astype(np.uint8)
    x[0] = 0
    x[1] = 255
    x[2, ..., 0] = 0
    x[2, ..., -1] = 255
    return x


def test_encode_bin_centres():
    x = np.arange(256, dtype=np.uint8)
    out = np.asarray(vdm.encode(x))
    np.testing.assert_allclose(out, np_encode(x), rtol=0, atol=1e-7)
    assert out[0] == pytest.approx(-255 / 256) and out[-1] == pytest.approx(255 / 256)


@pytest.mark.parametrize("gamma_0", [-13.3, -8.0, -3.0, 1.5])
def test_reconstruction_loss(gamma_0):
    x = images(49, 0)
    eps = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    got = np.asarray(vdm.reconstruction_loss(x, eps, gamma_0))
    want = np_reconstruction(x, eps, gamma_0)
    assert got.shape == (49,)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)


def test_reconstruction_loss_edges_are_finite_and_small_at_low_noise():
    x = np.array([[[[0]]], [[[255]]]], np.uint8)
    got = np.asarray(vdm.reconstruction_loss(x, np.zeros(x.shape, np.float32), -13.3))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


@pytest.mark.parametrize("gamma_1", [-2.0, 5.0, 8.0, 12.0])
def test_prior_loss(gamma_1):
    x = images(49, 2)
    got = np.asarray(vdm.prior_loss(x, gamma_1))
    np.testing.assert_allclose(got, np_prior(x, gamma_1), rtol=1e-5, atol=1e-6)


def cubic_gamma(t):
    return -10.0 + 12.0 * t + 3.0 * t**3


def np_cubic(t):
    return -10.0 + 12.0 * t + 3.0 * t**3


@pytest.mark.parametrize("timesteps", [0, 10, 1000])
def test_diffusion_loss(timesteps):
    rng = np.random.default_rng(3)
    batch = 49
    t = rng.uniform(0, 1, batch).astype(np.float32)
    t[0] = 1.0
    eps = rng.standard_normal((batch, 4, 4, 3)).astype(np.float32)
    eps_hat = rng.standard_normal((batch, 4, 4, 3)).astype(np.float32)
    f = np.zeros_like(eps)
    got = np.asarray(vdm.diffusion_loss(f, t, eps, eps_hat, cubic_gamma, timesteps))
    mse = ((eps.astype(np.float64) - eps_hat) ** 2).reshape(batch, -1).sum(1)
    t64 = t.astype(np.float64)
    if timesteps == 0:
        want = 0.5 * (12.0 + 9.0 * t64**2) * mse
    else:
        tq = np.ceil(t64 * timesteps) / timesteps
        want = 0.5 * timesteps * np.expm1(np_cubic(tq) - np_cubic(tq - 1 / timesteps)) * mse
    rtol = 1e-3 if timesteps == 1000 else 1e-5
    np.testing.assert_allclose(got, want, rtol=rtol)


@pytest.mark.parametrize("batch", [1, 7, 49, 98, 103, 128])
def test_antithetic_times(batch):
    t = np.asarray(vdm.antithetic_times(0.731, batch))
    assert t.shape == (batch,)
    want = np.mod(0.731 + np.arange(batch) / batch, 1.0)
    np.testing.assert_allclose(t, want, atol=1e-6)
    np.testing.assert_allclose(np.sort(np.diff(np.sort(t))), 1.0 / batch, atol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="batch_size"):
        vdm.antithetic_times(0.1, 0)
    with pytest.raises(ValueError, match="timesteps"):
        vdm.discretise_times(0.5, -1)
    with pytest.raises(ValueError, match="num_dims"):
        vdm.bits_per_dim(jnp.ones(2), jnp.ones(2), jnp.ones(2), 0)


def test_ancestral_and_ddim_steps():
    rng = np.random.default_rng(4)
    z, eh, e = (rng.standard_normal((5, 2, 2, 1)) for _ in range(3))
    gs = np.array([-8.0, -3.0, 0.0, 1.0, 4.0])
    gt = gs + np.array([0.01, 0.5, 1.0, 2.0, 0.001])
    bc = (slice(None), None, None, None)
    a2s, a2t, s2s, s2t = np_sigmoid(-gs), np_sigmoid(-gt), np_sigmoid(gs), np_sigmoid(gt)
    c = 1 - np.exp(gs - gt)
    want = np.sqrt(a2s / a2t)[bc] * (z - np.sqrt(s2t)[bc] * c[bc] * eh) + np.sqrt(s2s * c)[bc] * e
    got = vdm.ancestral_step(z, eh, e, gs, gt)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # DDIM: z_s = alpha_s x_hat + sigma_s eps_hat with x_hat = (z_t - sigma_t eps_hat) / alpha_t.
    x_hat = (z - np.sqrt(s2t)[bc] * eh) / np.sqrt(a2t)[bc]
    want = np.sqrt(a2s)[bc] * x_hat + np.sqrt(s2s)[bc] * eh
    np.testing.assert_allclose(np.asarray(vdm.ddim_step(z, eh, gs, gt)), want, rtol=1e-4, atol=1e-5)


def test_bits_per_dim():
    rng = np.random.default_rng(5)
    r, p, d = (rng.uniform(0, 100, 49) for _ in range(3))
    out = vdm.bits_per_dim(r, p, d, 3072)
    scale = 1 / (3072 * np.log(2))
    np.testing.assert_allclose(float(out["bpd_recon"]), r.mean() * scale, rtol=1e-6)
    np.testing.assert_allclose(float(out["bpd"]), (r + p + d).mean() * scale, rtol=1e-6)


def test_timestep_embedding_and_fourier_layout():
    t = np.array([0.0, 0.25, 1.0])
    got = np.asarray(vdm.timestep_embedding(t, 8))
    freqs = np.exp(-np.arange(4) * np.log(10000) / 3)
    ang = 1000 * t[:, None] * freqs
    np.testing.assert_allclose(got, np.concatenate([np.sin(ang), np.cos(ang)], 1), atol=2e-4)
    assert vdm.timestep_embedding(t, 9).shape == (3, 9)
    z = np.random.default_rng(6).uniform(-1, 1, (2, 3, 3, 2))
    feats = np.asarray(vdm.fourier_features(z))
    cols = [2.0**n * 2 * np.pi * z[..., c] for c in range(2) for n in (6, 7)]
    h = np.stack(cols, -1)
    np.testing.assert_allclose(feats, np.concatenate([np.sin(h), np.cos(h)], -1), atol=2e-3)


# ---------------------------------------------------------------- schedules


def test_fixed_schedule_returns_arrays():
    s = vdm.FixedLinearSchedule(-13.3, 5.0)
    g0, g1 = s.endpoints()
    assert isinstance(g0, jax.Array) and g0.shape == ()
    np.testing.assert_allclose([float(g0), float(g1)], [-13.3, 5.0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.derivative(jnp.array([0.2, 0.9]))), 18.3, rtol=1e-6)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        vdm.FixedLinearSchedule(5.0, -13.3)
    with pytest.raises(ValueError, match="learned_net"):
        vdm.make_schedule("cosine", -13.3, 5.0, rngs=nnx.Rngs(0))


def test_learned_scalar_schedule():
    s = vdm.LearnedScalarSchedule(-13.3, 5.0)
    t = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(s(t)), -13.3 + 18.3 * t, atol=1e-5)
    s.w[...] = jnp.array([-4.0])  # |w| keeps it increasing
    np.testing.assert_allclose(np.asarray(s(t)), -13.3 + 4.0 * t, atol=1e-5)
    g0, g1 = s.endpoints()
    np.testing.assert_allclose([float(g0), float(g1)], [-13.3, -9.3], atol=1e-5)


def np_monotone_net(params, t):
    t = t.astype(np.float64)[:, None]
    k1, b1 = np.abs(params["l1"]["kernel"]), params["l1"]["bias"]
    k2, b2 = np.abs(params["l2"]["kernel"]), params["l2"]["bias"]
    k3 = np.abs(params["l3"]["kernel"])
    hidden = 2 * (np_sigmoid((2 * (t - 0.5)) @ k2 + b2) - 0.5)
    return (t @ k1 + b1 + hidden @ k3 / k2.shape[1])[:, 0]


def random_net(features, pin):
    s = vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(0), features=features, pin_endpoints=pin)
    rng = np.random.default_rng(7)
    for layer in (s.l1, s.l2, s.l3):
        layer.kernel[...] = jnp.asarray(rng.normal(0, 3, layer.kernel.shape), jnp.float32)
        if layer.bias is not None:
            layer.bias[...] = jnp.asarray(rng.normal(0, 3, layer.bias.shape), jnp.float32)
    params = {
        name: {
            k: np.asarray(v[...], np.float64)
            for k, v in vars(getattr(s, name)).items()
            if isinstance(v, nnx.Param)
        }
        for name in ("l1", "l2", "l3")
    }
    return s, params


call_schedule = nnx.jit(lambda schedule, t: schedule(t))
call_derivative = nnx.jit(lambda schedule, t: schedule.derivative(t))


def test_monotone_net_matches_reference_structure():
    s, params = random_net(16, pin=False)
    t = np.linspace(0, 1, 101).astype(np.float32)
    got = np.asarray(call_schedule(s, t))
    np.testing.assert_allclose(got, np_monotone_net(params, t), rtol=1e-5, atol=1e-4)
    g0, g1 = s.endpoints()
    np.testing.assert_allclose(float(g0), np_monotone_net(params, np.zeros(1))[0], rtol=1e-5)
    np.testing.assert_allclose(float(g1), np_monotone_net(params, np.ones(1))[0], rtol=1e-5)
    # Initialised near the linear schedule (the hidden path starts at ~1e-4 amplitude).
    s0 = vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(call_schedule(s0, t)), -13.3 + 18.3 * t, atol=1e-3)


@pytest.mark.parametrize("pin", [False, True])
def test_monotone_net_stays_monotone_and_pins_endpoints(pin):
    s, params = random_net(32, pin=pin)
    if pin:
        s.b[...] = jnp.array([-7.0])
        s.w[...] = jnp.array([-9.0])
    t = np.linspace(0, 1, 2001).astype(np.float32)
    g = np.asarray(call_schedule(s, t))
    assert np.all(np.diff(g) >= -1e-5)
    assert np.all(np.asarray(call_derivative(s, t)) >= 0)
    if pin:
        g0, g1 = s.endpoints()
        assert (float(g0), float(g1)) == (-7.0, 2.0)
        np.testing.assert_allclose([g[0], g[-1]], [-7.0, 2.0], atol=1e-5)
        raw = np_monotone_net(params, t)
        want = -7.0 + 9.0 * (raw - raw[0]) / (raw[-1] - raw[0])
        np.testing.assert_allclose(g, want, atol=1e-4)
    # gamma' by jvp equals a central finite difference of the float64 reference.
    tt = np.array([0.2, 0.5, 0.8])
    h = 1e-4
    raw_fd = (np_monotone_net(params, tt + h) - np_monotone_net(params, tt - h)) / (2 * h)
    if pin:
        raw = np_monotone_net(params, np.array([0.0, 1.0]))
        raw_fd = raw_fd * 9.0 / (raw[1] - raw[0])
    got = np.asarray(call_derivative(s, tt.astype(np.float32)))
    np.testing.assert_allclose(got, raw_fd, rtol=2e-3)


def test_pinned_net_starts_linear_at_unit_scale():
    t = np.linspace(0, 1, 101).astype(np.float32)
    for hidden_init in (0.01, 1.0):
        s = vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(2), hidden_init=hidden_init)
        assert float(s.l1.kernel[...][0, 0]) == 1.0 and float(s.l1.bias[...][0]) == 0.0
        np.testing.assert_allclose(np.asarray(call_schedule(s, t)), -13.3 + 18.3 * t, atol=0.05)
    # hidden_init sets the spread of the hidden units' slopes
    wide = vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(2), hidden_init=1.0)
    assert 0.5 < float(jnp.std(wide.l2.kernel[...])) < 1.5
    with pytest.raises(ValueError, match="hidden_init must be > 0"):
        vdm.MonotoneNetSchedule(-13.3, 5.0, rngs=nnx.Rngs(2), hidden_init=0.0)


def test_shape_learning_rate_and_clip_mask_touch_only_the_shape_network(tmp_path):
    from flaxlab.configs import get_preset
    from flaxlab.models.vdm import VDMTask
    from flaxlab.train import Estimator

    tiny = [
        "model.schedule=learned_net",
        "model.schedule_features=4",
        "model.schedule_learning_rate=7",
        "model.width=8",
        "model.depth=0",
        "model.groups=4",
        "optimizer.name=sgd",
        "optimizer.sgd.momentum=0",
        "optimizer.weight_decay=0",
        "optimizer.warmup_steps=0",
        "optimizer.decay=constant",
        "optimizer.learning_rate=1",
    ]
    config = get_preset("vdm-digits", tiny)
    estimator = Estimator(config, tmp_path / "run", progress=False)  # the optimizer it trains with
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), estimator.abstract_params)
    updates, _ = estimator.tx.update(params, estimator.tx.init(params), params)
    clip = VDMTask(config).gradient_clip_mask(params)
    seen = set()
    for (path, update), keep in zip(
        jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(clip)
    ):
        names = [str(getattr(k, "key", k)) for k in path]
        shape_net = "schedule" in names and any(n in ("l1", "l2", "l3") for n in names)
        seen.add(shape_net)
        np.testing.assert_allclose(np.asarray(update), -7.0 if shape_net else -1.0)
        assert keep == (not shape_net), names
    assert seen == {True, False}
    # Where the shape gets the plain loss gradient (discrete time, no variance gradient) it is
    # clipped with the rest; unpinned, the net also holds the endpoints: no multiplier either.
    for extra in (["model.timesteps=10"], ["model.variance_gradient=false"]):
        assert VDMTask(get_preset("vdm-digits", tiny + extra)).gradient_clip_mask(params) is None
    unpinned = VDMTask(get_preset("vdm-digits", tiny + ["model.pin_endpoints=false"]))
    assert unpinned.gradient_clip_mask(params) is None
    tx = optax.sgd(1.0)
    assert unpinned.wrap_optimizer(tx) is tx
    with pytest.raises(ValueError, match="schedule_learning_rate must be > 0"):
        vdm.vdm_preset("digits", schedule_learning_rate=0.0)


def test_weight_decay_mask_excludes_schedule():
    config = vdm.vdm_preset("digits", width=8, depth=1, groups=4)
    model = nnx.eval_shape(lambda: vdm.VDM(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = vdm.weight_decay_mask(params)
    flat = jax.tree_util.tree_leaves_with_path(mask)
    assert flat
    for path, keep in flat:
        names = [str(getattr(k, "key", k)) for k in path]
        assert keep == ("schedule" not in names), names
    assert any(not keep for _, keep in flat) and any(keep for _, keep in flat)


# ---------------------------------------------------------------- variance gradient


def test_with_variance_gradient_matches_formula():
    rng = np.random.default_rng(8)
    nu = rng.uniform(0, 1, 6)
    dnu = rng.uniform(0.5, 2, 6)
    a = rng.normal(size=6)
    c = 1.7
    scale = 0.3

    def per_example(shape, other):
        nu_, dnu_ = shape
        a_, c_ = other
        return c_ * dnu_ * (a_ - nu_) ** 2

    def objective(nu_, dnu_, a_, c_):
        losses = vdm.with_variance_gradient(per_example, (nu_, dnu_), (a_, c_), scale)
        return jnp.mean(losses * scale)

    args = [jnp.asarray(v, jnp.float32) for v in (nu, dnu, a)] + [jnp.float32(c)]
    value = objective(*args)
    g_nu, g_dnu, g_a, g_c = jax.grad(objective, argnums=(0, 1, 2, 3))(*args)
    loss = c * dnu * (a - nu) ** 2
    np.testing.assert_allclose(float(value), np.mean(loss * scale), rtol=1e-5)
    n = len(nu)
    # Shape arguments: gradient of mean((s L)^2); the rest: gradient of mean(s L).
    np.testing.assert_allclose(
        np.asarray(g_nu), 2 * scale * loss * scale * c * dnu * -2 * (a - nu) / n, rtol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(g_dnu), 2 * scale * loss * scale * c * (a - nu) ** 2 / n, rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(g_a), scale * c * dnu * 2 * (a - nu) / n, rtol=1e-4)
    np.testing.assert_allclose(float(g_c), np.mean(scale * dnu * (a - nu) ** 2), rtol=1e-4)
