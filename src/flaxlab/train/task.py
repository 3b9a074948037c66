"""The Task protocol (the estimator's only view of a model family), its base class and config.

A task knows its model and its loss; the estimator knows everything else (loop, optimizer,
sharding, checkpoints, metrics, resumption). Each model family exposes its task as ``Task`` in
its module (:mod:`flaxlab.models.registry`), with its settings as ``Task.Config``, a frozen
dataclass that sits in ``ExperimentConfig.task`` (``--set task.label_smoothing=0.1``).

Every hook the estimator calls is declared in :class:`Task`; :class:`TaskBase` gives the
optional ones their defaults, so a family implements ``loss``, ``evaluate`` and ``predict``
(and ``init_model`` when its model is not built as ``Model(config.model, rngs=rngs)``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import optax
from flax import nnx

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
BEST_MODES = ("max", "min")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Settings every task has.

    Attributes:
      best_metric: the evaluation metric that ranks checkpoints (``flaxlab eval --watch`` keeps
        the best ones) and that the last line of ``flaxlab train`` states.
      best_mode: ``max`` or ``min``: whether larger or smaller ``best_metric`` is better.
    """

    best_metric: str = "loss"
    best_mode: str = "min"

    def __post_init__(self):
        if self.best_mode not in BEST_MODES:
            raise ValueError(
                f"task.best_mode={self.best_mode!r} is not supported; accepted: {list(BEST_MODES)}"
            )


@runtime_checkable
class Task(Protocol):
    """How a model family plugs into the estimator.

    * ``init_model(rngs)`` builds the NNX module.
    * ``loss(model, batch, rngs)`` returns the scalar training loss and a dict of scalar metrics
      (averaged over the batch). ``rngs`` has ``dropout`` and ``sample`` streams.
    * ``evaluate(model, batch)`` returns *summed* metrics over the batch's real examples
      (``batch["mask"]``) and their ``count``; the estimator adds them up over the evaluation
      set and calls ``summarize``.
    * ``predict(model, batch)`` returns per-example arrays; ``flaxlab predict`` writes exactly
      these (rows of padding removed) to an ``.npz`` file.

    Hooks (defaults in :class:`TaskBase`):

    * ``weight_decay_mask(params)``: which parameters weight decay applies to (None: kernels).
    * ``wrap_optimizer(tx)``: the optimizer the estimator uses, built around ``tx`` (per-group
      learning rates, frozen parameters).
    * ``gradient_clip_mask(params)``: which gradients global-norm clipping measures and scales
      (None: all).
    * ``summarize(sums)``: the evaluation metrics from the summed ones.
    * ``headline(metrics)``: one line stating the task's main result.
    * ``prerequisites(workdir)``: runs to train before this one, as
      ``(preset name, --set overrides, work directory, model config)`` (``flaxlab train``
      trains them first; e.g. LiT's image tower).
    * ``initialize(model, workdir, load)``: after a fresh run's initialisation, load what the
      task needs into the model (``load(module, path)`` reads any checkpoint flaxlab reads).
    """

    config: Any

    def init_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def loss(self, model, batch: Batch, rngs: nnx.Rngs) -> tuple[jax.Array, Metrics]: ...

    def evaluate(self, model, batch: Batch) -> Metrics: ...

    def predict(self, model, batch: Batch) -> dict[str, jax.Array]: ...

    def weight_decay_mask(self, params) -> Any: ...

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation: ...

    def gradient_clip_mask(self, params) -> Any: ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]: ...

    def headline(self, metrics: dict[str, float]) -> str: ...

    def prerequisites(self, workdir) -> list[tuple[str, list[str], Any, Any]]: ...

    def initialize(self, model, workdir, load) -> None: ...


class TaskBase(abc.ABC):
    """Defaults of the optional hooks; subclasses set ``Config`` and the three required methods.

    Args:
      config: the :class:`~flaxlab.train.config.ExperimentConfig`; ``config.task`` is an
        instance of ``type(self).Config``.
    """

    Config: ClassVar[type] = TaskConfig

    def __init__(self, config):
        self.config = config

    @property
    def settings(self):
        """This task's own settings (``config.task``)."""
        return self.config.task

    def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """``Model(config.model, rngs=rngs)`` with the family's registered model class."""
        from flaxlab.models.registry import model_class

        return model_class(self.config.family)(self.config.model, rngs=rngs)

    @abc.abstractmethod
    def loss(self, model, batch: Batch, rngs: nnx.Rngs) -> tuple[jax.Array, Metrics]:
        """The scalar training loss and a dict of scalar metrics (batch means)."""

    @abc.abstractmethod
    def evaluate(self, model, batch: Batch) -> Metrics:
        """Summed metrics over the batch's real examples and their ``count``."""

    @abc.abstractmethod
    def predict(self, model, batch: Batch) -> dict[str, jax.Array]:
        """Per-example arrays, as ``flaxlab predict`` writes them."""

    def weight_decay_mask(self, params) -> Any:
        """None: weight decay on kernels and embeddings (``flaxlab.optim.factory.kernel_mask``)."""
        return None

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        return tx

    def gradient_clip_mask(self, params) -> Any:
        """None: global-norm clipping measures and scales every gradient."""
        return None

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Every sum divided by ``count`` (which is kept as it is)."""
        count = max(float(sums.get("count", 0.0)), 1.0)
        out = {k: float(v) / count for k, v in sums.items() if k != "count"}
        out["count"] = float(sums.get("count", 0.0))
        return out

    def prerequisites(self, workdir) -> list[tuple[str, list[str], Any, Any]]:
        """None: the run needs no other run."""
        return []

    def initialize(self, model, workdir, load) -> None:  # noqa: B027 - an optional hook
        """Nothing to load besides ``init.checkpoint``."""

    def headline(self, metrics: dict[str, float]) -> str:
        """``"<best_metric>: <value>"``."""
        name = self.settings.best_metric
        value = metrics.get(name)
        return f"{name}: {value:.4f}" if value is not None else f"{name}: not measured"
