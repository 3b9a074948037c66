"""Builds the optimizer and its learning-rate schedule from an optimizer config.

The config is duck-typed (any object with the fields of
:class:`flaxlab.train.config.OptimizerConfig`), so this module does not depend on ``train``.
"""

from __future__ import annotations

import math

import jax
import optax

from flaxlab.optim.amos_defaults import amos_with_defaults


def peak_learning_rate(config, total_steps: int) -> float:
    """The schedule's peak: ``learning_rate``; for Amos, ``amos_learning_rate`` (its ``xi``)
    or, when that is unset, the paper's rule ``xi = 1 / sqrt(number of batches)``."""
    if config.name == "amos":
        xi = getattr(config, "amos_learning_rate", None)
        return float(xi) if xi is not None else 1.0 / math.sqrt(max(total_steps, 1))
    return config.learning_rate


def make_schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak learning rate, then cosine, linear or constant decay.

    The decay runs over the steps after warmup and ends at ``peak * end_learning_rate_factor``.
    """
    peak = peak_learning_rate(config, total_steps)
    end = peak * config.end_learning_rate_factor
    warmup = min(config.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if config.decay == "cosine":
        after = optax.cosine_decay_schedule(
            peak, decay_steps, alpha=config.end_learning_rate_factor
        )
    elif config.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif config.decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"optimizer.decay={config.decay!r} is not supported; "
            "accepted: ['cosine', 'linear', 'constant']"
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def kernel_mask(params):
    """True for leaves named ``kernel`` or ``embedding`` (weight decay applies to those only)."""

    def is_matrix(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", getattr(last, "idx", None)))
        return str(name) in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(
    config, total_steps: int, params=None, decay_mask=None
) -> optax.GradientTransformation:
    """The optimizer named by ``config.name`` with global-norm clipping in front.

    Args:
      config: optimizer settings (see :class:`flaxlab.train.config.OptimizerConfig`).
      total_steps: training length, for the schedule.
      params: the parameter tree (Amos derives its per-parameter rules from it).
      decay_mask: which parameters weight decay applies to (a pytree of bools or a function
        of the parameters); default :func:`kernel_mask`.
    """
    mask = decay_mask or kernel_mask
    schedule = make_schedule(config, total_steps)
    if config.name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=mask,
        )
    elif config.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    elif config.name == "amos":
        # Default rules derived from each parameter's name and shape (fan-in eta, factored
        # slots); Amos decays weights adaptively, so `weight_decay` does not apply.
        tx = amos_with_defaults(
            schedule,
            beta=config.amos_beta,
            momentum=config.amos_momentum,
            clip_value=config.amos_clip_value,
            extra_l2=config.amos_extra_l2,
        )
    else:
        raise ValueError(f"optimizer.name={config.name!r} is not supported; accepted: {OPTIMIZERS}")
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


OPTIMIZERS = ["adamw", "sgd", "amos"]
