"""The VDM task: trains a :class:`~flaxlab.models.vdm.VDM` through the estimator.

Batches carry images scaled to [-1, 1] (the shared image pipeline); they are turned back into
exact uint8 pixels, ``round((x + 1) * 127.5)``, which VDM encodes to bin centres itself.
Evaluation reports test bits/dim averaged over ``task.eval_draws`` stratified ``(t, eps)`` draws per
image, with its 95% confidence interval (``bpd_ci95``), not a single stochastic draw.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlab.models.vdm.model import VDM, bpd_confidence_interval, evaluate_bpd
from flaxlab.models.vdm.schedules import is_shape_path, weight_decay_mask
from flaxlab.train.task import TaskBase, TaskConfig


@dataclasses.dataclass(frozen=True)
class VDMTaskConfig(TaskConfig):
    """VDM task settings.

    Attributes:
      eval_draws: stratified ``(t, eps)`` draws per test image (the reference takes one).
      best_metric, best_mode: test bits/dim, lower is better.
    """

    eval_draws: int = 4
    best_metric: str = "bpd"
    best_mode: str = "min"

    def __post_init__(self):
        super().__post_init__()
        if self.eval_draws < 1:
            raise ValueError(f"task.eval_draws={self.eval_draws} must be >= 1")


def to_pixels(images: jax.Array) -> jax.Array:
    """[-1, 1] floats from the image pipeline back to the exact uint8 pixels."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class VDMTask(TaskBase):
    """VDM likelihood training; the loss is the ELBO in bits/dim."""

    Config = VDMTaskConfig

    def weight_decay_mask(self, params):
        """Weight decay everywhere but the noise schedule (a fix of the reference)."""
        return weight_decay_mask(params)

    def wrap_optimizer(self, tx):
        """Scales the updates of the schedule's shape network by
        ``model.schedule_learning_rate`` (``learned_net`` with pinned endpoints only: unpinned,
        the network also carries the endpoints, which keep the optimizer's rate)."""
        multiplier = self.config.model.schedule_learning_rate
        if multiplier == 1.0 or not self.config.model.has_shape_network:
            return tx
        shape_only = partial(jax.tree_util.tree_map_with_path, lambda path, _: is_shape_path(path))
        return optax.chain(tx, optax.masked(optax.scale(multiplier), shape_only))

    def gradient_clip_mask(self, params):
        """Global-norm clipping applies to everything but the schedule's shape network when
        that is trained on the variance of the loss (continuous time): its gradient is on
        another objective and scale, and would otherwise throttle the score network's steps.
        ``None`` (clip everything) when the shape gets the ordinary loss gradient."""
        if not self.config.model.shape_on_variance:
            return None
        return jax.tree_util.tree_map_with_path(lambda path, _: not is_shape_path(path), params)

    def _labels(self, batch):
        return batch["label"] if self.config.model.num_classes else None

    def loss(self, model: VDM, batch, rngs: nnx.Rngs):
        bpd, metrics = model.loss(
            to_pixels(batch["image"]), self._labels(batch), rngs, deterministic=False
        )
        metrics = dict(metrics)
        metrics["loss"] = bpd
        return bpd, metrics

    def _per_image(self, model: VDM, batch):
        pixels = to_pixels(batch["image"])
        # A key per batch from its contents: evaluation is deterministic, batches differ.
        key = jax.random.fold_in(jax.random.key(0), jnp.sum(pixels.astype(jnp.int32)))
        return evaluate_bpd(model, pixels, self._labels(batch), key, self.settings.eval_draws)

    def evaluate(self, model: VDM, batch):
        per_image = self._per_image(model, batch)
        mask = batch["mask"].astype(jnp.float32)
        out = {k: jnp.sum(v * mask) for k, v in per_image.items()}
        out["bpd_sq"] = jnp.sum(jnp.square(per_image["bpd"]) * mask)
        out["count"] = jnp.sum(mask)
        return out

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["count"], 1.0)
        mean, half = bpd_confidence_interval(sums["bpd"], sums["bpd_sq"], int(count))
        out = {k: v / count for k, v in sums.items() if k not in ("count", "bpd_sq", "bpd")}
        out.update(bpd=mean, bpd_ci95=half, loss=mean, count=sums["count"])
        return out

    def predict(self, model: VDM, batch):
        return self._per_image(model, batch)

    def headline(self, metrics: dict[str, float]) -> str:
        return (
            f"test bits/dim: {metrics['bpd']:.4f} +- {metrics['bpd_ci95']:.4f} "
            "(95% interval over images)"
        )
