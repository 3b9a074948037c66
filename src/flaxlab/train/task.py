"""The Task protocol — the estimator's only view of a model family — and image classification.

A task knows its model and its loss; the estimator knows everything else (loop, optimizer,
sharding, checkpoints, metrics, resumption). Adding a model family is a module in ``models/``,
a task (often :class:`ClassificationTask` as it is) and presets in ``configs/``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlab.models.registry import model_class

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@runtime_checkable
class Task(Protocol):
    """How a model family plugs into the estimator.

    * ``init_model(rngs)`` builds the NNX module.
    * ``loss(model, batch, rngs)`` returns the scalar training loss and a dict of scalar metrics
      (averaged over the batch). ``rngs`` has ``dropout`` and ``sample`` streams.
    * ``evaluate(model, batch)`` returns *summed* metrics over the batch's real examples
      (``batch["mask"]``) and their ``count``; the estimator adds them up over the evaluation set
      and calls ``summarize`` (default: every sum divided by ``count``).
    * ``predict(model, batch)`` returns per-example arrays written by ``flaxlab predict``.
    """

    def init_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def loss(self, model, batch: Batch, rngs: nnx.Rngs) -> tuple[jax.Array, Metrics]: ...

    def evaluate(self, model, batch: Batch) -> Metrics: ...

    def predict(self, model, batch: Batch) -> dict[str, jax.Array]: ...


def summarize(task, sums: dict[str, float]) -> dict[str, float]:
    """The task's own summary of summed evaluation metrics, or sums divided by the count."""
    if hasattr(task, "summarize"):
        return task.summarize(sums)
    count = max(float(sums.get("count", 0.0)), 1.0)
    out = {k: float(v) / count for k, v in sums.items() if k != "count"}
    out["count"] = float(sums.get("count", 0.0))
    return out


def split_model_output(output) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Models return logits, or ``(logits, aux)`` where aux may hold ``aux_loss`` and metrics."""
    if isinstance(output, tuple):
        logits, aux = output
        return logits, dict(aux)
    return output, {}


class ClassificationTask:
    """Image classification with softmax cross-entropy (optionally label-smoothed).

    Batches are ``{"image": float [B, H, W, C] in [-1, 1], "label": int [B]}`` (plus ``mask``
    for evaluation). Models may return ``(logits, aux)``; ``aux["aux_loss"]`` (e.g. MoE load
    balancing) is added to the training loss and the other aux entries become metrics.
    """

    def __init__(self, config):
        self.config = config
        self.model_cls = model_class(config.family)
        self.label_smoothing = config.train.label_smoothing

    def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return self.model_cls(self.config.model, rngs=rngs)

    def loss(self, model, batch: Batch, rngs: nnx.Rngs):
        logits, aux = split_model_output(model(batch["image"], deterministic=False, rngs=rngs))
        num_classes = logits.shape[-1]
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), self.label_smoothing)
        ce = optax.softmax_cross_entropy(logits, targets).mean()
        metrics = {
            "cross_entropy": ce,
            "accuracy": (logits.argmax(-1) == labels).mean(),
        }
        aux_loss = aux.pop("aux_loss", jnp.zeros(()))
        for key, value in aux.items():
            value = jnp.asarray(value)
            if value.ndim == 0:
                metrics[key] = value
            else:  # e.g. per-expert load: one metric per entry
                for i, v in enumerate(value.reshape(-1)):
                    metrics[f"{key}_{i}"] = v
        loss = ce + aux_loss
        metrics["loss"] = loss
        return loss, metrics

    def evaluate(self, model, batch: Batch) -> Metrics:
        logits, _ = split_model_output(model(batch["image"], deterministic=True))
        mask = batch["mask"].astype(jnp.float32)
        labels = batch["label"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "loss": (ce * mask).sum(),
            "accuracy": ((logits.argmax(-1) == labels) * mask).sum(),
            "count": mask.sum(),
        }

    def predict(self, model, batch: Batch) -> dict[str, jax.Array]:
        logits, _ = split_model_output(model(batch["image"], deterministic=True))
        return {"prediction": logits.argmax(-1), "probabilities": jax.nn.softmax(logits)}


_TASKS: dict[str, Any] = {
    "classification": ClassificationTask,
    "vdm": "flaxlab.train.vdm_task:VDMTask",
    "lm": "flaxlab.train.lm_task:LMTask",
}


def register_task(name: str, factory) -> None:
    """Registers a task class (or ``"module:Class"`` string) under ``name``."""
    _TASKS[name] = factory


def make_task(config) -> Task:
    """The task named by ``config.task``, built from the experiment config."""
    if config.task not in _TASKS:
        raise ValueError(f"unknown task {config.task!r}; accepted: {sorted(_TASKS)}")
    factory = _TASKS[config.task]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(config)
