"""The pure train step against a float64 NumPy twin: gradient, accumulation, clipping, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlab.train import TaskBase, clip_by_global_norm, make_init_fn, make_train_step
from flaxlab.train.step import make_model_step, split_model


class Linear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3,)))
        self.b = nnx.Param(jnp.full((), 0.5))

    def __call__(self, x):
        return x @ self.w[...] + self.b[...]


class Regression(TaskBase):
    """Mean squared error of a linear model (config is unused)."""

    def init_model(self, rngs):
        return Linear(rngs)

    def loss(self, model, batch, rngs):
        loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
        return loss, {"loss": loss}

    def evaluate(self, model, batch):
        return {"loss": jnp.sum((model(batch["x"]) - batch["y"]) ** 2), "count": 4.0}

    def predict(self, model, batch):
        return {"y": model(batch["x"])}


def np_grad(w, b, x, y):
    """Gradient of mean((x w + b - y)^2) in float64."""
    r = x @ w + b - y
    return 2 * x.T @ r / len(y), 2 * r.mean()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(8, 3)).astype(np.float32),
        "y": rng.normal(size=8).astype(np.float32),
    }


@pytest.mark.parametrize("accum, clip", [(1, None), (2, None), (1, 0.1), (4, 0.1)])
def test_sgd_step_matches_numpy(batch, accum, clip):
    task = Regression(None)
    tx = optax.sgd(0.1)
    graphdef, _, _ = split_model(task.init_model(nnx.Rngs(0)))
    init = make_init_fn(task, tx, seed=0, ema=True)
    step = jax.jit(
        make_train_step(
            task,
            tx,
            graphdef,
            seed=0,
            schedule=optax.constant_schedule(0.1),
            grad_accum_steps=accum,
            grad_clip_norm=clip,
            ema_decay=0.5,
        )
    )
    state = init()
    w0, b0 = (np.asarray(state["params"][k][...], np.float64) for k in ("w", "b"))
    new, metrics = step(state, batch)
    gw, gb = np_grad(w0, b0, batch["x"].astype(np.float64), batch["y"].astype(np.float64))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    scale = 1.0 if clip is None else min(1.0, clip / norm)
    np.testing.assert_allclose(new["params"]["w"][...], w0 - 0.1 * scale * gw, rtol=1e-5)
    np.testing.assert_allclose(new["params"]["b"][...], b0 - 0.1 * scale * gb, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)  # before clipping
    assert float(metrics["learning_rate"]) == pytest.approx(0.1)
    # EMA warm-up at step 0: decay min(0.5, 1/10) = 0.1.
    np.testing.assert_allclose(
        new["ema"]["w"][...], 0.1 * w0 + 0.9 * np.asarray(new["params"]["w"][...]), rtol=1e-5
    )
    assert int(new["step"]) == 1


def test_clip_mask_leaves_gradients_out_of_the_norm_and_the_scaling():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([100.0])}
    clipped, norm = clip_by_global_norm(grads, 1.0, {"a": True, "b": False})
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [100.0])
    same, _ = clip_by_global_norm(grads, None)
    np.testing.assert_array_equal(same["b"], grads["b"])


def test_each_step_draws_from_seed_and_step(batch):
    """Dropout-style randomness: the key of step t is fold_in(key(seed), t), so a step is a
    pure function of (state, batch) and two runs agree step for step."""

    class Noisy(Regression):
        def loss(self, model, batch, rngs):
            noise = jax.random.normal(rngs.dropout(), batch["y"].shape)
            loss = jnp.mean((model(batch["x"]) - batch["y"] - noise) ** 2)
            return loss, {"loss": loss}

    task = Noisy(None)
    tx = optax.sgd(0.1)
    graphdef, _, _ = split_model(task.init_model(nnx.Rngs(0)))
    step = jax.jit(make_train_step(task, tx, graphdef, seed=3))
    state = make_init_fn(task, tx, seed=0, ema=False)()
    a, _ = step(state, batch)
    b, _ = step(make_init_fn(task, tx, seed=0, ema=False)(), batch)
    np.testing.assert_array_equal(a["params"]["w"][...], b["params"]["w"][...])
    c, _ = step(a, batch)  # step 1 draws other noise than step 0 would
    other = jax.jit(make_train_step(task, tx, graphdef, seed=4))
    d, _ = other(make_init_fn(task, tx, seed=0, ema=False)(), batch)
    assert not np.allclose(a["params"]["w"][...], d["params"]["w"][...])
    assert int(c["step"]) == 2


def test_model_step_calls_the_task(batch):
    task = Regression(None)
    graphdef, params, rest = split_model(task.init_model(nnx.Rngs(0)))
    out = jax.jit(make_model_step(task, graphdef, "predict"))(params, rest, batch)
    w, b = np.asarray(params["w"][...]), float(params["b"][...])
    np.testing.assert_allclose(out["y"], batch["x"] @ w + b, rtol=1e-5)
    with pytest.raises(ValueError, match="method='loss'"):
        make_model_step(task, graphdef, "loss")
