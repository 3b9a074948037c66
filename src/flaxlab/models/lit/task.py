"""The LiT task: contrastive tuning of the text tower against captions, zero-shot evaluation.

Training batches are ``{"image", "label", "caption"}``: a caption is one of the task's training
templates (picked by ``caption % len(templates)``) filled with the image's class, e.g. "a photo
of the number seven" or "handwritten 7" (``{name}`` is the class name, ``{label}`` its index).
Evaluation is zero-shot classification with *other* templates: each class's prompts are
embedded, averaged and re-normalised, and an image is given the class of the highest
``t * zimg . zclass``; ``flaxlab eval`` reports that accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.models.lit.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from flaxlab.models.lit.model import LiT, zero_shot_classifier, zero_shot_logits
from flaxlab.models.lit.text import make_tokenizer
from flaxlab.train.task import TaskBase, TaskConfig

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a photo of the number {name}.",
    "handwritten {label}",
    "the digit {name}",
    "a drawing of a {label}",
    "{name}",
    "a scan of the number {label}.",
)
EVAL_TEMPLATES = ("an image of {name}.", "the number {label}", "a small picture of a {name}")
# The digits presets the image tower is trained with when none is given.
IMAGE_PRESETS = {"vit": "vit-digits", "mixer": "mixer-digits"}


@dataclasses.dataclass(frozen=True)
class LiTTaskConfig(TaskConfig):
    """LiT task settings.

    Attributes:
      class_names: the classes' names for captions and zero-shot prompts.
      train_templates: caption templates for training (``{name}``, ``{label}``).
      eval_templates: the zero-shot prompts (different from the training ones).
      image_train_steps: steps of the image tower's digits preset when the task has to train
        one (``model.image_checkpoint`` unset).
      best_metric, best_mode: zero-shot accuracy, higher is better.
    """

    class_names: tuple[str, ...] = DIGIT_NAMES
    train_templates: tuple[str, ...] = TRAIN_TEMPLATES
    eval_templates: tuple[str, ...] = EVAL_TEMPLATES
    image_train_steps: int = 2500
    best_metric: str = "zeroshot_accuracy"
    best_mode: str = "max"

    def __post_init__(self):
        super().__post_init__()
        for name in ("class_names", "train_templates", "eval_templates"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if not value:
                raise ValueError(f"task.{name} must not be empty")
        for template in self.train_templates + self.eval_templates:
            try:
                template.format(name="x", label="0")
            except (KeyError, IndexError, ValueError):
                raise ValueError(
                    f"template {template!r}: only the fields {{name}} and {{label}} are accepted"
                ) from None


def prompts(class_names, templates) -> list[list[str]]:
    """``[class][template]`` texts."""
    return [[t.format(name=n, label=i) for t in templates] for i, n in enumerate(class_names)]


def tokenize_prompts(class_names, templates, tokenizer_spec: str, max_len: int) -> np.ndarray:
    """``int32 [classes, templates, max_len]`` tokens of every class's prompts."""
    tokenizer = make_tokenizer(tokenizer_spec)
    texts = prompts(class_names, templates)
    flat = tokenizer([t for row in texts for t in row], max_len)
    return flat.reshape(len(class_names), len(templates), max_len)


class LiTTask(TaskBase):
    """Contrastive image-text training with a locked (or not) image tower."""

    Config = LiTTaskConfig

    def __init__(self, config):
        super().__init__(config)
        model, settings = config.model, config.task
        args = (model.text.tokenizer, model.text.max_len)
        self.train_tokens = tokenize_prompts(settings.class_names, settings.train_templates, *args)
        self.eval_tokens = tokenize_prompts(settings.class_names, settings.eval_templates, *args)

    # ------------------------------------------------------------------ the image tower

    def image_tower_path(self, workdir: Path) -> Path:
        """Where the image tower's weights come from: ``model.image_checkpoint``, else the
        run the task trains in ``<workdir>/image_tower``."""
        path = self.config.model.image_checkpoint
        return Path(path) if path else Path(workdir) / "image_tower"

    def prerequisites(self, workdir):
        """The image tower's run, when no checkpoint is given and it is not trained yet."""
        model = self.config.model
        path = self.image_tower_path(workdir)
        if model.image_checkpoint or (path / "checkpoints").is_dir() and _finished(path):
            return []
        preset = IMAGE_PRESETS[model.image_family]
        steps = self.settings.image_train_steps
        return [(preset, [f"train.steps={steps}"], path, model.image)]

    def initialize(self, model, workdir, load) -> None:
        """Loads the image tower's weights (``load(module, path)``)."""
        path = self.image_tower_path(workdir)
        if not path.exists():
            raise ValueError(
                f"the LiT image tower {str(path)!r} does not exist: set "
                "model.image_checkpoint to a flaxlab run or a released .npz"
            )
        load(model.image, path)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """A locked image tower: no update and no optimizer state."""
        if not self.config.model.locked:
            return tx

        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if _top(path) == "image" else "train", params
            )

        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

    # ------------------------------------------------------------------ task

    def loss(self, model: LiT, batch, rngs: nnx.Rngs):
        templates = self.train_tokens.shape[1]
        tokens = jnp.asarray(self.train_tokens)[batch["label"], batch["caption"] % templates]
        zimg, ztxt = model(batch["image"], tokens, deterministic=False, rngs=rngs)
        t = model.temperature
        if model.config.loss == "sigmoid":
            loss = sigmoid_contrastive_loss(zimg, ztxt, t, model.bias)
        else:
            loss = softmax_contrastive_loss(zimg, ztxt, t)
        # Image-to-text retrieval within the batch (pairs of one class count as right).
        chosen = jnp.argmax(zimg @ ztxt.T, axis=1)
        retrieval = jnp.mean(batch["label"][chosen] == batch["label"])
        metrics = {"loss": loss, "temperature": t, "retrieval_accuracy": retrieval}
        if model.config.loss == "sigmoid":
            metrics["bias"] = model.bias
        return loss, metrics

    def _zero_shot(self, model: LiT, images):
        classifier = zero_shot_classifier(model, jnp.asarray(self.eval_tokens))
        return zero_shot_logits(model, images, classifier)

    def evaluate(self, model: LiT, batch):
        logits = self._zero_shot(model, batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        right = (jnp.argmax(logits, -1) == batch["label"]) * mask
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]) * mask
        return {"zeroshot_accuracy": right.sum(), "zeroshot_loss": ce.sum(), "count": mask.sum()}

    def predict(self, model: LiT, batch):
        logits = self._zero_shot(model, batch["image"])
        out = {"prediction": jnp.argmax(logits, -1), "probabilities": jax.nn.softmax(logits)}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def headline(self, metrics: dict[str, float]) -> str:
        chance = 100.0 / len(self.settings.class_names)
        return (
            f"zero-shot test accuracy: {100 * metrics['zeroshot_accuracy']:.2f}% "
            f"(chance {chance:.1f}%)"
        )


def _top(path) -> str:
    first = path[0]
    return str(getattr(first, "key", getattr(first, "name", first)))


def _finished(run: Path) -> bool:
    import json

    try:
        return json.loads((run / "status.json").read_text()).get("state") == "done"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def zero_shot(model: LiT, config, class_names, images, templates=None) -> np.ndarray:
    """Class probabilities ``[N, C]`` of images (float in [-1, 1]) for any class names, with the
    run's evaluation templates (or ``templates``)."""
    text = config.model.text
    tokens = tokenize_prompts(
        class_names, templates or config.task.eval_templates, text.tokenizer, text.max_len
    )
    logits = nnx.jit(lambda m, x, t: zero_shot_logits(m, x, zero_shot_classifier(m, t)))(
        model, jnp.asarray(images), jnp.asarray(tokens)
    )
    return np.asarray(jax.nn.softmax(logits, axis=-1))
