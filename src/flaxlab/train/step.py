"""The training and evaluation steps: pure functions of arrays, built once per run.

The training state is a dict of arrays: ``params`` (the model's ``nnx.Param`` state), ``rest``
(every other model variable: counters, FAVOR+ projections), ``opt_state``, ``step`` (int32) and,
with an exponential moving average, ``ema``. :func:`make_train_step` returns
``train_step(state, batch) -> (state, metrics)``, a pure function for the caller to ``jax.jit``
(the estimator donates the state). Everything random is a function of ``(seed, step)``:
the step's key is ``fold_in(key(seed), step)``, so a resumed run repeats the draws of an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

State = dict[str, Any]


def split_model(model: nnx.Module):
    """``(graphdef, params, rest)``: the model's structure, its parameters, everything else."""
    return nnx.split(model, nnx.Param, ...)


def make_init_fn(task, tx: optax.GradientTransformation, seed: int, ema: bool) -> Callable:
    """``init() -> state``: fresh parameters from ``nnx.Rngs(seed)``, optimizer state, step 0
    and (``ema``) the average started at the parameters."""

    def init() -> State:
        _, params, rest = split_model(task.init_model(nnx.Rngs(seed)))
        state = {
            "params": params,
            "rest": rest,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }
        if ema:
            state["ema"] = params
        return state

    return init


def make_grad_fn(task, graphdef) -> Callable:
    """``grad_fn(params, rest, batch, key, step) -> ((loss, (metrics, rest)), grads)``.

    ``rngs`` for the task's loss are ``nnx.Rngs(key, dropout=fold_in(key, 1),
    sample=fold_in(key, 2))``. The model is rebuilt from ``params`` and ``rest`` inside the
    trace; state the model updates while training (a FAVOR+ redraw counter) comes back as the
    new ``rest``.
    """

    def loss_fn(model, batch, key):
        rngs = nnx.Rngs(key, dropout=jax.random.fold_in(key, 1), sample=jax.random.fold_in(key, 2))
        return task.loss(model, batch, rngs)

    # nnx.value_and_grad (not jax's) so that non-parameter state is carried out of the call.
    value_and_grad = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)

    def grad_fn(params, rest, batch, key, step=None):
        del step
        model = nnx.merge(graphdef, params, rest)
        (loss, metrics), grads = value_and_grad(model, batch, key)
        _, _, new_rest = split_model(model)
        return (loss, (metrics, new_rest)), grads

    return grad_fn


def make_sharpness_grad_fn(
    task,
    graphdef,
    *,
    kind: str,
    rho_max: float,
    rho_min: float,
    alpha: float,
    adaptive: bool,
    schedule: optax.Schedule,
    lr_max: float,
    lr_min: float,
    mesh=None,
    scope: str = "device",
) -> Callable:
    """A SAM or GSAM ``grad_fn`` (same signature as :func:`make_grad_fn`'s).

    ``rho = gsam_rho(schedule(step), rho_max, rho_min, lr_max, lr_min)``; GSAM's ``alpha``
    (SAM: 0). With ``scope="device"`` and a mesh whose ``data`` axis has several devices, each
    device perturbs the parameters with the gradient of its own share of the batch
    ("m-sharpness", as the reference), and the resulting gradients are averaged; with
    ``scope="global"`` the perturbation uses the gradient of the whole batch. The metrics gain
    ``surrogate_gap`` (``f(w + e) - f(w)``) and ``sharpness_rho``.
    """
    from jax.sharding import PartitionSpec as P

    from flaxlab.optim.sharpness import gsam_rho, sharpness_gradient

    if kind not in ("sam", "gsam"):
        raise ValueError(f"optimizer.sharpness={kind!r}; accepted: ['none', 'sam', 'gsam']")
    if scope not in ("device", "global"):
        raise ValueError(f"optimizer.sharpness_scope={scope!r}; accepted: ['device', 'global']")
    gsam_alpha = alpha if kind == "gsam" else 0.0

    def loss_fn(params, rest, batch, key):
        # Fresh variables for the non-parameter state: the model may update it (a FAVOR+
        # counter), which NNX allows only on variables of the current trace.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        rngs = nnx.Rngs(key, dropout=jax.random.fold_in(key, 1), sample=jax.random.fold_in(key, 2))
        loss, metrics = task.loss(model, batch, rngs)
        _, _, new_rest = split_model(model)
        return loss, (metrics, new_rest)

    def compute(params, rest, batch, key, step):
        rho = jnp.asarray(
            gsam_rho(schedule(step), rho_max=rho_max, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
        )
        out = sharpness_gradient(
            loss_fn,
            params,
            rest,
            batch,
            key,
            rho=rho,
            alpha=gsam_alpha,
            adaptive=adaptive,
            has_aux=True,
        )
        metrics, new_rest = out.aux
        metrics = dict(metrics, surrogate_gap=out.perturbed_loss - out.loss, sharpness_rho=rho)
        return (out.loss, (metrics, new_rest)), out.grads

    axes = ("data", "fsdp", "expert")  # the batch's mesh axes
    if scope == "global" or mesh is None or all(mesh.shape.get(a, 1) == 1 for a in axes):
        return compute

    def per_device(params, rest, batch, key, step):
        key = jax.random.fold_in(key, jax.lax.axis_index(axes))
        (loss, (metrics, new_rest)), grads = compute(params, rest, batch, key, step)
        mean = lambda tree: jax.tree.map(lambda x: jax.lax.pmean(x, axes), tree)
        return (mean(loss), (mean(metrics), new_rest)), mean(grads)

    batch_spec = P(axes)
    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), batch_spec, P(), P()),
        out_specs=P(),
        check_vma=False,  # the model's non-parameter state is the same on every device
    )

    def grad_fn(params, rest, batch, key, step=None):
        return sharded(params, rest, batch, key, step)

    return grad_fn


def global_norm(tree) -> jax.Array:
    """The l2 norm of all leaves together."""
    norm = getattr(getattr(optax, "tree", None), "norm", None)
    return norm(tree) if norm is not None else optax.global_norm(tree)


def clip_by_global_norm(grads, clip_norm: float | None, clip_mask=None):
    """``(grads, norm)``: the norm of the masked-in gradients (``clip_mask``: a pytree of
    bools like ``grads``; None: all) and the gradients with those scaled by
    ``min(1, clip_norm / norm)`` (none when ``clip_norm`` is None); the others unchanged."""
    if clip_mask is None:
        clip_mask = jax.tree.map(lambda _: True, grads)
    norm = global_norm(
        jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), grads, clip_mask)
    )
    if clip_norm is not None:
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
        grads = jax.tree.map(lambda g, m: (g * scale).astype(g.dtype) if m else g, grads, clip_mask)
    return grads, norm


def make_train_step(
    task,
    tx: optax.GradientTransformation,
    graphdef,
    *,
    seed: int,
    schedule: optax.Schedule | None = None,
    grad_accum_steps: int = 1,
    grad_clip_norm: float | None = None,
    clip_mask=None,
    ema_decay: float = 0.0,
    grad_fn: Callable | None = None,
) -> Callable[[State, dict], tuple[State, dict]]:
    """``train_step(state, batch) -> (new_state, metrics)``, pure (``jax.jit`` it).

    One step: the gradient of ``task.loss`` (averaged over ``grad_accum_steps`` micro-batches
    of the batch, in a ``lax.scan``), global-norm clipping of the ``clip_mask``-ed gradients
    (reusing the norm it logs), ``tx``, and the EMA ``e <- d e + (1 - d) p`` with the usual
    warm-up ``d = min(ema_decay, (1 + t) / (10 + t))``.

    Args:
      task: a :class:`~flaxlab.train.task.Task`.
      tx: the optimizer (without clipping: this step clips).
      graphdef: the model's graph definition (:func:`split_model`).
      seed: the run's seed; step ``t`` draws from ``fold_in(key(seed), t)``.
      schedule: the learning-rate schedule, logged as ``learning_rate``.
      grad_accum_steps: micro-batches per batch (the batch size must divide).
      grad_clip_norm: global-norm clipping threshold (None: none).
      clip_mask: which gradients clipping measures and scales (None: all).
      ema_decay: the parameter average's decay (0: no average).
      grad_fn: the gradient function (default :func:`make_grad_fn`), e.g. a sharpness-aware
        one with the same signature.

    Returns:
      The step; its metrics are the task's (means over micro-batches) plus ``grad_norm`` and,
      with a schedule, ``learning_rate``.
    """
    grad_fn = grad_fn or make_grad_fn(task, graphdef)
    base_key = jax.random.key(seed)

    def accumulate(params, rest, batch, key, step):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def body(carry, inputs):
            # params ride in the carry: NNX builds the model from this trace's values.
            grads_sum, rest, p = carry
            index, microbatch = inputs
            micro_key = jax.random.fold_in(key, index)
            (_, (m, rest)), g = grad_fn(p, rest, microbatch, micro_key, step)
            return (jax.tree.map(jnp.add, grads_sum, g), rest, p), m

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, rest, _), per_micro = jax.lax.scan(
            body, (zeros, rest, params), (jnp.arange(grad_accum_steps), micro)
        )
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        return grads, rest, jax.tree.map(lambda m: m.mean(0), per_micro)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        params, rest, step = state["params"], state["rest"], state["step"]
        key = jax.random.fold_in(base_key, step)
        if grad_accum_steps == 1:
            (_, (metrics, rest)), grads = grad_fn(params, rest, batch, key, step)
        else:
            grads, rest, metrics = accumulate(params, rest, batch, key, step)
        grads, grad_norm = clip_by_global_norm(grads, grad_clip_norm, clip_mask)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {"params": params, "rest": rest, "opt_state": opt_state, "step": step + 1}
        if "ema" in state:
            decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            new_state["ema"] = jax.tree.map(
                lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params
            )
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        if schedule is not None:
            metrics["learning_rate"] = schedule(step)
        return new_state, metrics

    return train_step


def make_model_step(task, graphdef, method: str) -> Callable:
    """``step(params, rest, batch) -> task.<method>(model, batch)`` (``method``: ``evaluate``
    or ``predict``), pure (``jax.jit`` it)."""
    if method not in ("evaluate", "predict"):
        raise ValueError(f"method={method!r}; accepted: ['evaluate', 'predict']")
    fn = getattr(task, method)
    return lambda params, rest, batch: fn(nnx.merge(graphdef, params, rest), batch)
