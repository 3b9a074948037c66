"""Amos update maths against an independent float64 NumPy implementation, state, dtypes, trees."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlab.optim import AmosState, ScaleByAmosState, amos, scale_by_amos
from flaxlab.optim.amos.transform import leaf_names, unpack_slots

EPSILON = 2.0**-125


# ----------------------------------------------------------------------------- NumPy reference
def reference_leaf(g, theta, v, b, m, *, t, xi, eta, slot_shape, hp):
    """One parameter's clip -> Amos -> momentum step in float64 (paper / jestimator maths)."""
    g = np.asarray(g, np.float64)
    theta = np.asarray(theta, np.float64)
    if hp.get("clip_value"):
        g = np.clip(g, -hp["clip_value"], hp["clip_value"])
    if slot_shape == ():
        g2 = np.mean(g * g)
    else:
        axes = tuple(i for i, (s, k) in enumerate(zip(slot_shape, g.shape, strict=True)) if s < k)
        g2 = np.mean(g * g, axis=axes, keepdims=True) if axes else g * g
    beta = hp.get("beta", 0.999)
    v = beta * v + (1.0 - beta) * g2
    r = (1.0 - beta**t) / np.maximum(v, hp.get("epsilon", EPSILON))
    gamma = xi**2 * r * g2 / np.sqrt(1.0 + hp.get("c_coef", 0.25) * np.sqrt(xi) * b)
    lr0 = xi * eta
    d = 1.0 / (1.0 + hp.get("d_coef", 0.25) * np.sqrt(lr0) * b)
    u = -d * ((gamma / 2.0 + hp.get("extra_l2", 0.0)) * theta + lr0 * np.sqrt(r) * g)
    b = b + gamma * (1.0 + b)
    if hp.get("momentum"):
        m = hp["momentum"] * m + (1.0 - hp["momentum"]) * u
        u = m
    return u, v, b, m


class ReferenceAmos:
    """Runs :func:`reference_leaf` over a dict name -> array, keeping its own float64 state."""

    def __init__(self, params, eta, slot_shapes, learning_rate, hp):
        self.eta, self.slot_shapes, self.learning_rate, self.hp = (
            eta,
            slot_shapes,
            learning_rate,
            hp,
        )
        self.params = {k: np.asarray(p, np.float64) for k, p in params.items()}
        self.v = {k: np.zeros(slot_shapes[k]) for k in params}
        self.b = {k: np.zeros(slot_shapes[k]) for k in params}
        self.m = {k: np.zeros(np.shape(p)) for k, p in params.items()}
        self.t = 0

    def step(self, grads):
        self.t += 1
        lr = self.learning_rate
        xi = float(lr(self.t)) if callable(lr) else lr
        updates = {}
        for k, theta in self.params.items():
            u, self.v[k], self.b[k], self.m[k] = reference_leaf(
                grads[k],
                theta,
                self.v[k],
                self.b[k],
                self.m[k],
                t=self.t,
                xi=xi,
                eta=self.eta[k],
                slot_shape=self.slot_shapes[k],
                hp=self.hp,
            )
            updates[k] = u
            self.params[k] = theta + u
        return updates


# ----------------------------------------------------------------------------- shared set-up
SHAPES = {  # name -> (shape, slot shape, eta)
    "kernel": ((4, 6), (1, 6), 0.3),  # factored over the input axis
    "embedding": ((5, 3), (5, 1), 0.8),  # factored over features, with zero-gradient rows
    "conv": ((2, 2, 3, 4), (1, 1, 3, 4), 0.2),  # two reduced axes of four
    "bias": ((6,), (), 0.5),  # one scalar per tensor
    "full": ((3, 2), (3, 2), 1.0),  # full-size slots
}


def tree_of(flat):
    """Nested layout of the flat test dict: names like ('layers', '0', 'kernel')."""
    return {
        "layers": [{"kernel": flat["kernel"], "bias": flat["bias"]}],
        "embed": {"embedding": flat["embedding"]},
        "conv": flat["conv"],
        "full": flat["full"],
    }


def flat_of(tree):
    return {
        "kernel": tree["layers"][0]["kernel"],
        "bias": tree["layers"][0]["bias"],
        "embedding": tree["embed"]["embedding"],
        "conv": tree["conv"],
        "full": tree["full"],
    }


NAME_TO_KEY = {
    ("layers", "0", "kernel"): "kernel",
    ("layers", "0", "bias"): "bias",
    ("embed", "embedding"): "embedding",
    ("conv",): "conv",
    ("full",): "full",
}


def eta_fn(name, shape):
    key = NAME_TO_KEY[name]
    assert tuple(shape) == SHAPES[key][0]
    return SHAPES[key][2]


def shape_fn(name, shape):
    return SHAPES[NAME_TO_KEY[name]][1]


def make_params(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tree_of({k: jnp.asarray(rng.normal(size=s[0]), dtype) for k, s in SHAPES.items()})


def make_grads(step, dtype=jnp.float32):
    rng = np.random.default_rng(100 + step)
    flat = {k: 2.0 * rng.normal(size=s[0]) for k, s in SHAPES.items()}
    flat["embedding"][[1, 3]] = 0.0  # rows of an embedding table that no token used
    return tree_of({k: jnp.asarray(g, dtype) for k, g in flat.items()})


def warmup_schedule(count):
    return 0.05 * jnp.minimum(1.0, count / 3.0)


def warmup_schedule_np(t):
    return 0.05 * min(1.0, t / 3.0)


CONFIGS = {
    "defaults": dict(hp={}, lr=0.02),
    "all_hyperparameters": dict(
        hp=dict(beta=0.9, momentum=0.8, clip_value=1.5, extra_l2=0.01, d_coef=0.4, c_coef=0.3),
        lr="schedule",
    ),
    "momentum_only": dict(hp=dict(beta=0.5, momentum=0.9), lr=0.1),
    "clip_and_epsilon": dict(hp=dict(clip_value=0.7, epsilon=1e-3, beta=0.99), lr=0.03),
}


def run_both(config, num_steps=5, dtype=jnp.float32, jit=True):
    hp, lr = config["hp"], config["lr"]
    jax_lr, np_lr = (warmup_schedule, warmup_schedule_np) if lr == "schedule" else (lr, lr)
    tx = amos(jax_lr, eta_fn, shape_fn, **hp)
    params = make_params(dtype)
    reference = ReferenceAmos(
        flat_of(jax.tree.map(lambda p: np.asarray(p, np.float64), params)),
        {k: s[2] for k, s in SHAPES.items()},
        {k: s[1] for k, s in SHAPES.items()},
        np_lr,
        hp,
    )
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    step = jax.jit(step) if jit else step
    history = []
    for i in range(num_steps):
        grads = make_grads(i, dtype)
        reference_updates = reference.step(flat_of(jax.tree.map(np.asarray, grads)))
        params, updates, state = step(params, state, grads)
        history.append((flat_of(updates), reference_updates, state, reference))
    return params, state, reference, history


@pytest.fixture(scope="module", params=list(CONFIGS))
def float32_run(request):
    return request.param, run_both(CONFIGS[request.param])


# ----------------------------------------------------------------------------- the maths
def test_updates_match_float64_reference(float32_run):
    name, (params, state, reference, history) = float32_run
    for step, (updates, reference_updates, _, _) in enumerate(history):
        for key in SHAPES:
            np.testing.assert_allclose(
                np.asarray(updates[key], np.float64),
                reference_updates[key],
                rtol=2e-4,
                atol=1e-7,
                err_msg=f"{name}: update of {key} at step {step + 1}",
            )
    final = flat_of(params)
    for key in SHAPES:
        np.testing.assert_allclose(final[key], reference.params[key], rtol=1e-5, atol=1e-6)


def test_slots_match_float64_reference(float32_run):
    name, (_, state, reference, _) = float32_run
    assert isinstance(state, AmosState)
    assert state.count.dtype == jnp.int32 and int(state.count) == 5
    params = make_params()
    v = flat_of(unpack_slots(state.v, params, shape_fn))
    b = flat_of(unpack_slots(state.b, params, shape_fn))
    for key in SHAPES:
        assert v[key].shape == SHAPES[key][1], key
        np.testing.assert_allclose(v[key], reference.v[key], rtol=1e-5, atol=1e-30)
        np.testing.assert_allclose(b[key], reference.b[key], rtol=1e-4, atol=1e-9)
    if CONFIGS[name]["hp"].get("momentum"):
        m = flat_of(state.momentum)
        for key in SHAPES:
            np.testing.assert_allclose(m[key], reference.m[key], rtol=2e-4, atol=1e-7)
    else:
        assert state.momentum is None


def test_zero_gradient_rows_keep_only_the_extra_l2_decay(float32_run):
    name, (_, _, _, history) = float32_run
    # Rows 1 and 3 of the embedding never get a gradient: gamma = 0 there (v = 0 -> r = 1/eps,
    # times g2 = 0) and d = 1 at step 1, so only extra_l2 moves them: u = -extra_l2 * theta,
    # through the momentum's (1 - mu) when there is one.
    hp = CONFIGS[name]["hp"]
    theta = np.asarray(flat_of(make_params())["embedding"], np.float64)[[1, 3]]
    expected = -(1 - (hp.get("momentum") or 0.0)) * hp.get("extra_l2", 0.0) * theta
    updates, reference_updates, _, _ = history[0]
    np.testing.assert_allclose(np.asarray(updates["embedding"])[[1, 3]], expected, rtol=1e-6)
    np.testing.assert_allclose(reference_updates["embedding"][[1, 3]], expected, rtol=1e-12)


def test_schedule_is_called_with_the_one_based_count():
    seen = []

    def schedule(count):
        seen.append(int(count))
        return 0.01

    tx = scale_by_amos(schedule, lambda name, shape: 1.0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert seen == [1, 2, 3]


def test_scale_by_amos_equals_the_reference_without_clip_and_momentum():
    hp = dict(beta=0.8, extra_l2=0.02, d_coef=0.5, c_coef=0.1)
    tx = scale_by_amos(0.05, eta_fn, shape_fn, **hp)
    params = make_params()
    reference = ReferenceAmos(
        flat_of(jax.tree.map(lambda p: np.asarray(p, np.float64), params)),
        {k: s[2] for k, s in SHAPES.items()},
        {k: s[1] for k, s in SHAPES.items()},
        0.05,
        hp,
    )
    state = tx.init(params)
    assert isinstance(state, ScaleByAmosState)
    update = jax.jit(tx.update)
    for i in range(3):
        grads = make_grads(i)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        expected = reference.step(flat_of(jax.tree.map(np.asarray, grads)))
        for key in SHAPES:
            np.testing.assert_allclose(flat_of(updates)[key], expected[key], rtol=2e-4, atol=1e-7)


def test_amos_equals_optax_chain_of_clip_scale_and_ema():
    hp = dict(beta=0.9, extra_l2=0.01, d_coef=0.3, c_coef=0.2)
    fused = amos(0.03, eta_fn, shape_fn, momentum=0.7, clip_value=1.0, **hp)
    chained = optax.chain(
        optax.clip(1.0),
        scale_by_amos(0.03, eta_fn, shape_fn, **hp),
        optax.ema(0.7, debias=False),
    )
    params_a = params_b = make_params()
    state_a, state_b = fused.init(params_a), chained.init(params_b)
    update_a, update_b = jax.jit(fused.update), jax.jit(chained.update)
    for i in range(4):
        grads = make_grads(i)
        u_a, state_a = update_a(grads, state_a, params_a)
        u_b, state_b = update_b(grads, state_b, params_b)
        params_a, params_b = optax.apply_updates(params_a, u_a), optax.apply_updates(params_b, u_b)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    jax.tree.map(chex_close, params_a, params_b)


def test_jit_and_eager_agree():
    config = CONFIGS["all_hyperparameters"]
    jitted, _, _, _ = run_both(config, num_steps=2, jit=True)
    eager, _, _, _ = run_both(config, num_steps=2, jit=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), jitted, eager)


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_use_float32_slots_and_stay_finite(dtype):
    hp = dict(CONFIGS["all_hyperparameters"]["hp"], extra_l2=0.0)
    params, state, reference, history = run_both(dict(hp=hp, lr="schedule"), 3, dtype=dtype)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == dtype and np.all(np.isfinite(np.asarray(leaf, np.float32)))
    for leaf in jax.tree.leaves((state.v, state.b, state.momentum)):
        assert leaf.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(history[0][0]["embedding"], np.float32)[[1, 3]], 0.0)
    # The reference runs on the same low-precision gradients but from float64 parameters; the
    # two trajectories agree to the precision of the parameter dtype.
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    final = flat_of(params)
    for key in SHAPES:
        np.testing.assert_allclose(
            np.asarray(final[key], np.float64),
            reference.params[key],
            rtol=tolerance,
            atol=tolerance,
        )


def test_float16_zero_gradient_gives_no_nan_even_with_a_denormal_epsilon():
    tx = amos(0.1, lambda n, s: 1.0, lambda n, s: (), momentum=0.9, epsilon=1e-45)
    params = {"w": jnp.ones((2, 3), jnp.float16)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.zeros((2, 3), jnp.float16)}, state, params)
    assert updates["w"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), 0.0)
    assert np.all(np.isfinite(np.asarray(state.b)))


# ----------------------------------------------------------------------------- trees
def test_leaf_names_of_nested_dicts_lists_and_a_bare_array():
    assert leaf_names(make_params()) == [
        ("conv",),
        ("embed", "embedding"),
        ("full",),
        ("layers", "0", "bias"),
        ("layers", "0", "kernel"),
    ]
    assert leaf_names(jnp.ones(2)) == [()]


class TinyModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(7, 4, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.LayerNorm(4, rngs=rngs)])

    def __call__(self, tokens):
        x = self.embed(tokens)
        return self.blocks[1](self.blocks[0](x))


def test_nnx_state_names_and_a_jitted_training_step():
    model = TinyModel(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    seen = set()

    def recording_eta(name, shape):
        seen.add(name)
        return 0.5

    def slots(name, shape):
        return (1, shape[-1]) if name[-1] == "kernel" else ()

    tx = amos(0.05, recording_eta, slots, momentum=0.9, clip_value=1.0)
    state = tx.init(params)
    assert seen == {
        ("embed", "embedding"),
        ("blocks", "0", "kernel"),
        ("blocks", "0", "bias"),
        ("blocks", "1", "scale"),
        ("blocks", "1", "bias"),
    }
    assert unpack_slots(state.v, params, slots)["blocks"][0]["kernel"][...].shape == (1, 4)
    assert state.v.shape == (4 + 4,)  # the kernel's columns + a scalar for each other tensor
    tokens = jnp.array([[1, 2, 3], [4, 5, 6]])

    @jax.jit
    def train_step(params, state):
        def loss(params):
            return jnp.mean(jnp.square(nnx.merge(graphdef, params)(tokens) - 1.0))

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for _ in range(30):
        params, state, value = train_step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
    assert isinstance(params, nnx.State) and int(state.count) == 30


def test_chains_with_other_optax_transformations():
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        amos(0.05, eta_fn, shape_fn, momentum=0.9),
    )
    params = make_params()
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(make_grads(0), state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_converges_on_a_parabola():
    tx = amos(0.5, lambda n, s: 1.0, lambda n, s: (), momentum=0.5, clip_value=1.0)
    target = jnp.array([1.0, -1.0, 1.0])
    params = jnp.array([-1.0, 10.0, 1.0])
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum(jnp.square(p - target)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3000):
        params, state = step(params, state)
    np.testing.assert_allclose(params, target, atol=1e-2)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("slot_shape", "message"),
    [
        ((4, 1, 1), "shape \\(4, 6\\)"),
        ((2, 6), "accepted"),
        ((1.5, 6), "slot shape"),
        ("ab", "slot shape"),
        (None, "slot shape"),
    ],
)
def test_bad_shape_fn_results_are_refused_at_init(slot_shape, message):
    tx = amos(0.1, lambda n, s: 1.0, lambda n, s: slot_shape)
    with pytest.raises(ValueError, match=message) as info:
        tx.init({"dense": {"kernel": jnp.ones((4, 6))}})
    assert "dense/kernel" in str(info.value)


@pytest.mark.parametrize("eta", [-1.0, 0.0, math.nan, "big", None])
def test_bad_eta_values_are_refused_at_init(eta):
    tx = amos(0.1, lambda n, s: eta)
    with pytest.raises(ValueError, match="eta_fn returned .* 'w'"):
        tx.init({"w": jnp.ones(3)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(beta=1.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(momentum=1.0), "momentum"),
        (dict(clip_value=-1.0), "clip_value"),
        (dict(extra_l2=-1.0), "extra_l2"),
        (dict(d_coef=math.inf), "d_coef"),
        (dict(c_coef=-0.5), "c_coef"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(eta_fn=0.5), "eta_fn"),
        (dict(shape_fn=(1,)), "shape_fn"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    arguments = dict(learning_rate=0.1, eta_fn=lambda n, s: 1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        amos(**arguments)


def test_update_without_params_is_refused():
    tx = scale_by_amos(0.1, lambda n, s: 1.0)
    state = tx.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": jnp.ones(2)}, state)


# Tensors above amos._SMALL entries take the plain sum of squares when no slot's sum exceeds
# clip_value**2 and the clipped reduction otherwise: both branches against the reference.
LARGE_SHAPES = {  # name -> (shape, slot shape, eta)
    "kernel": ((130, 128), (1, 128), 0.1),
    "embedding": ((128, 130), (128, 1), 0.2),
    "bias": ((17000,), (), 0.5),
}


@pytest.mark.parametrize(
    "scales",
    [
        (0.01, 0.01, 0.01),  # no entry near the clip: the plain sums
        (3.0, 3.0, 3.0),  # most entries clipped: the clipped reduction
        (0.01, 0.01, "one_large"),  # a single clipped entry in one tensor
    ],
)
def test_large_tensors_match_the_reference_on_both_clip_branches(scales):
    hp = dict(beta=0.9, momentum=0.9, clip_value=1.0)
    rng = np.random.default_rng(7)
    params = {k: jnp.asarray(rng.normal(size=s[0]), jnp.float32) for k, s in LARGE_SHAPES.items()}
    names = {(k,): k for k in LARGE_SHAPES}
    tx = amos(
        0.05,
        lambda name, shape: LARGE_SHAPES[names[name]][2],
        lambda name, shape: LARGE_SHAPES[names[name]][1],
        **hp,
    )
    reference = ReferenceAmos(
        {k: np.asarray(p, np.float64) for k, p in params.items()},
        {k: s[2] for k, s in LARGE_SHAPES.items()},
        {k: s[1] for k, s in LARGE_SHAPES.items()},
        0.05,
        hp,
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(3):
        grads = {}
        for (k, s), scale in zip(LARGE_SHAPES.items(), scales, strict=True):
            g = rng.normal(size=s[0]) * (0.01 if scale == "one_large" else scale)
            if scale == "one_large":
                g.reshape(-1)[step * 11] = 5.0
            grads[k] = jnp.asarray(g, jnp.float32)
        expected = reference.step({k: np.asarray(g) for k, g in grads.items()})
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k in LARGE_SHAPES:
            np.testing.assert_allclose(updates[k], expected[k], rtol=2e-4, atol=1e-7)
