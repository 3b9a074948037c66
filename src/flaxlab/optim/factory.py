"""The optimizer settings and the optimizer + learning-rate schedule built from them.

:class:`OptimizerConfig` holds what every optimizer shares (peak learning rate, warm-up and
decay, weight decay, clipping, accumulation); each optimizer's own settings nest under its name
(``optimizer.adamw.b2``, ``optimizer.sgd.momentum``, ``optimizer.amos.rules``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from flaxlab.optim.amos.defaults import amos_with_defaults
from flaxlab.optim.amos.rules import load_rules_file
from flaxlab.optim.sharpness import SHARPNESS_KINDS

OPTIMIZERS = ("adamw", "sgd", "amos")
DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW's moments: ``b1``, ``b2`` and ``eps`` (optax.adamw)."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """SGD's heavy-ball ``momentum`` (0: none) and Nesterov's variant."""

    momentum: float = 0.9
    nesterov: bool = False


@dataclasses.dataclass(frozen=True)
class AmosConfig:
    """Amos settings (see :func:`flaxlab.optim.amos`; defaults are the paper's BERT settings).

    Attributes:
      learning_rate: the global learning rate ``xi`` (default: the paper's rule
        ``1 / sqrt(train.steps)``); ``optimizer.learning_rate`` is not used by Amos.
      beta, momentum, clip_value, extra_l2: as :func:`flaxlab.optim.amos` (momentum 0.9 and
        elementwise clip 1.0 as the paper; ``none`` turns either off).
      rules: a JSON or TOML file of per-parameter rules ``{name pattern: {eta, shape}}``
        tried before the defaults (:func:`flaxlab.optim.amos.load_rules_file`).
    """

    learning_rate: float | None = None
    beta: float = 0.999
    momentum: float | None = 0.9
    clip_value: float | None = 1.0
    extra_l2: float = 0.0
    rules: str | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
      name: ``adamw``, ``sgd`` or ``amos``; its own settings are under ``adamw``, ``sgd`` or
        ``amos``.
      learning_rate: peak learning rate (Amos: ``amos.learning_rate`` instead).
      warmup_steps: linear warm-up from 0 to the peak.
      decay: after warm-up, ``cosine``, ``linear`` or ``constant``.
      end_learning_rate_factor: final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay on kernels (AdamW, SGD); Amos decays adaptively.
      grad_clip_norm: clip the global gradient norm to this (None: no clipping).
      grad_accum_steps: split each batch into this many micro-batches and average their
        gradients.
      sharpness: ``none``, ``sam`` or ``gsam`` (:mod:`flaxlab.optim.sharpness`): the gradient
        at the worst nearby point, with any optimizer.
      rho_max, rho_min: the perturbation radius follows the learning rate from ``rho_max`` at
        the peak to ``rho_min`` (None: ``rho_max``) at the end (GSAM's rule; SAM with
        ``rho_min = rho_max`` is a constant radius).
      alpha: GSAM's weight on the surrogate gap's direction (``sam`` ignores it).
      adaptive: scale the perturbation by ``|w|`` (the reference's adaptive perturbation).
      sharpness_scope: ``device`` (each device perturbs with its own share of the batch,
        "m-sharpness", as the reference) or ``global`` (the whole batch).
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay: str = "cosine"
    end_learning_rate_factor: float = 0.0
    weight_decay: float = 1e-4
    grad_clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    adamw: AdamWConfig = dataclasses.field(default_factory=AdamWConfig)
    sgd: SGDConfig = dataclasses.field(default_factory=SGDConfig)
    amos: AmosConfig = dataclasses.field(default_factory=AmosConfig)
    sharpness: str = "none"
    rho_max: float = 0.05
    rho_min: float | None = None
    alpha: float = 0.6
    adaptive: bool = False
    sharpness_scope: str = "device"

    def __post_init__(self):
        for field, value, accepted in (
            ("optimizer.name", self.name, OPTIMIZERS),
            ("optimizer.decay", self.decay, DECAYS),
            ("optimizer.sharpness", self.sharpness, SHARPNESS_KINDS),
            ("optimizer.sharpness_scope", self.sharpness_scope, ("device", "global")),
        ):
            if value not in accepted:
                raise ValueError(f"{field}={value!r} is not supported; accepted: {list(accepted)}")
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate={self.learning_rate} must be > 0")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optimizer.grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"optimizer.grad_clip_norm={self.grad_clip_norm} must be > 0")
        if self.rho_max < 0 or (self.rho_min is not None and self.rho_min < 0):
            raise ValueError(
                f"optimizer.rho_max={self.rho_max}, rho_min={self.rho_min} must be >= 0"
            )


def peak_learning_rate(config: OptimizerConfig, total_steps: int) -> float:
    """The schedule's peak: ``learning_rate``; for Amos, ``amos.learning_rate`` (its ``xi``)
    or, when that is unset, the paper's rule ``xi = 1 / sqrt(number of batches)``."""
    if config.name == "amos":
        xi = config.amos.learning_rate
        return float(xi) if xi is not None else 1.0 / math.sqrt(max(total_steps, 1))
    return config.learning_rate


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
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
            f"optimizer.decay={config.decay!r} is not supported; accepted: {list(DECAYS)}"
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
    config: OptimizerConfig, total_steps: int, params=None, decay_mask=None
) -> optax.GradientTransformation:
    """The optimizer named by ``config.name`` with global-norm clipping in front.

    Args:
      config: optimizer settings.
      total_steps: training length, for the schedule.
      params: the parameter tree (unused; Amos derives its rules from the tree at ``init``).
      decay_mask: which parameters weight decay applies to (a pytree of bools or a function
        of the parameters); default :func:`kernel_mask`.
    """
    del params
    mask = decay_mask or kernel_mask
    schedule = make_schedule(config, total_steps)
    if config.name == "adamw":
        a = config.adamw
        tx = optax.adamw(
            schedule, b1=a.b1, b2=a.b2, eps=a.eps, weight_decay=config.weight_decay, mask=mask
        )
    elif config.name == "sgd":
        s = config.sgd
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=s.momentum or None, nesterov=s.nesterov),
        )
    elif config.name == "amos":
        # Default rules derived from each parameter's name and shape (fan-in eta, factored
        # slots), after the rules file's; Amos decays weights adaptively, so `weight_decay`
        # does not apply.
        a = config.amos
        eta, shape = load_rules_file(a.rules) if a.rules else ({}, {})
        tx = amos_with_defaults(
            schedule,
            eta_overrides=eta,
            shape_overrides=shape,
            beta=a.beta,
            momentum=a.momentum,
            clip_value=a.clip_value,
            extra_l2=a.extra_l2,
        )
    else:
        raise ValueError(
            f"optimizer.name={config.name!r} is not supported; accepted: {list(OPTIMIZERS)}"
        )
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx
