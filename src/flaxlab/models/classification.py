"""Image classification, the task shared by the ViT, MLP-Mixer and V-MoE families.

Batches are ``{"image": float [B, H, W, C] in [-1, 1], "label": int [B]}`` (plus ``mask`` for
evaluation, and ``soft_label`` float ``[B, classes]`` with Mixup). Models return logits, or
``(logits, aux)`` where ``aux["aux_loss"]`` (e.g. MoE load balancing) is added to the training
loss and the other entries become metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlab.train.task import Batch, Metrics, TaskBase, TaskConfig


@dataclasses.dataclass(frozen=True)
class ClassificationConfig(TaskConfig):
    """Classification settings.

    Attributes:
      label_smoothing: softmax cross-entropy against ``(1 - s) one_hot + s / classes``.
      best_metric, best_mode: test accuracy, higher is better.
    """

    label_smoothing: float = 0.0
    best_metric: str = "accuracy"
    best_mode: str = "max"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing={self.label_smoothing} must be in [0, 1)")


def split_model_output(output) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Models return logits, or ``(logits, aux)`` where aux may hold ``aux_loss`` and metrics."""
    if isinstance(output, tuple):
        logits, aux = output
        return logits, dict(aux)
    return output, {}


class ClassificationTask(TaskBase):
    """Softmax cross-entropy (optionally label-smoothed) on ``model(images)``.

    * ``loss`` metrics: ``loss`` (cross-entropy + auxiliary loss), ``cross_entropy``,
      ``accuracy`` and the model's auxiliary metrics (a vector metric becomes one per entry).
    * ``evaluate``: summed ``loss`` (unsmoothed cross-entropy) and ``accuracy`` with ``count``.
    * ``predict``: ``prediction`` (arg-max class), ``probabilities`` and, when the batch has
      labels, ``label``.
    """

    Config = ClassificationConfig

    def loss(self, model, batch: Batch, rngs: nnx.Rngs):
        logits, aux = split_model_output(model(batch["image"], deterministic=False, rngs=rngs))
        num_classes = logits.shape[-1]
        labels = batch["label"]
        if "soft_label" in batch:  # Mixup's mixed one-hot labels
            targets = batch["soft_label"].astype(jnp.float32)
            if targets.shape[-1] != num_classes:
                raise ValueError(
                    f"the data have {targets.shape[-1]} classes, the model {num_classes}; set "
                    f"model.num_classes={targets.shape[-1]}"
                )
        else:
            targets = jax.nn.one_hot(labels, num_classes)
        targets = optax.smooth_labels(targets, self.settings.label_smoothing)
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
        out = {"prediction": logits.argmax(-1), "probabilities": jax.nn.softmax(logits)}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def headline(self, metrics: dict[str, float]) -> str:
        return f"test accuracy: {100 * metrics['accuracy']:.2f}%"
