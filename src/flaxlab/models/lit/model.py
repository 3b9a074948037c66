"""LiT: a text tower trained contrastively against a (locked) image tower; zero-shot classifiers.

Zhai et al. 2021, "LiT: Zero-Shot Transfer with Locked-image text Tuning", arXiv 2111.07991;
reference big_vision ``models/proj/image_text/two_towers.py``. The image tower is any flaxlab
ViT or Mixer; its embedding is the representation its classification head reads (the
reference's ``out_dim=None`` for a locked tower; ``image_projection`` adds a trained dense
layer instead). The text tower (:class:`~flaxlab.models.lit.text.TextTransformer`) projects to
the same width. Both embeddings are L2-normalised, ``z / (||z|| + 1e-8)``; the logit scale is
``t = exp(t_param)`` with ``t_param`` initialised to ``log(temperature_init)`` (10, as the
reference configs), and SigLIP's loss adds a learned bias (initialised to -10).

A locked image tower gets no gradient (``stop_gradient``), no optimizer state and no update
(:class:`~flaxlab.models.lit.task.LiTTask`), and always runs in inference mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.models.lit.text import TextConfig, TextTransformer
from flaxlab.models.registry import family

LOSSES = ("softmax", "sigmoid")
IMAGE_FAMILIES = ("vit", "mixer")


@dataclasses.dataclass(frozen=True)
class LiTConfig:
    """A two-tower image-text model.

    Attributes:
      image_family: ``vit`` or ``mixer``.
      image: the image tower's config (a ``ViTConfig`` or ``MixerConfig``; a dict is read as
        one).
      image_checkpoint: the image tower's weights: a flaxlab run (work directory) or an
        official ``.npz``; None: the LiT task trains one first (``task.image_train_steps`` of
        the matching digits preset) when that is possible.
      locked: freeze the image tower (LiT's "locked image tuning").
      image_projection: a trained dense layer from the image representation to
        ``embed_dim`` (False: the representation is the embedding, as the reference's
        locked towers).
      embed_dim: the shared width (None: the image representation's width).
      text: the text tower.
      loss: ``softmax`` (CLIP/LiT) or ``sigmoid`` (SigLIP, with a learned bias).
      temperature_init: the initial logit scale ``t``.
      bias_init: the sigmoid loss's initial bias.
    """

    image_family: str = "vit"
    image: Any = None
    image_checkpoint: str | None = None
    locked: bool = True
    image_projection: bool = False
    embed_dim: int | None = None
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    loss: str = "softmax"
    temperature_init: float = 10.0
    bias_init: float = -10.0

    def __post_init__(self):
        if self.image_family not in IMAGE_FAMILIES:
            raise ValueError(
                f"model.image_family={self.image_family!r}; accepted: {list(IMAGE_FAMILIES)}"
            )
        config_class = family(self.image_family).Config
        image = self.image
        if image is None:
            image = config_class()
        elif isinstance(image, dict):
            from flaxlab.train.config import dataclass_from_dict

            image = dataclass_from_dict(config_class, image)
        if not isinstance(image, config_class):
            raise ValueError(
                f"model.image must be a {config_class.__name__} for image_family="
                f"{self.image_family!r}, got {type(image).__name__}"
            )
        object.__setattr__(self, "image", image)
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextConfig(**self.text))
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss={self.loss!r}; accepted: {list(LOSSES)}")
        if self.temperature_init <= 0:
            raise ValueError(f"model.temperature_init={self.temperature_init} must be > 0")
        if self.embed_dim is not None and not self.image_projection:
            rep = getattr(image, "representation_size", None) or image.hidden_size
            if self.embed_dim != rep:
                raise ValueError(
                    f"model.embed_dim={self.embed_dim} differs from the image representation's "
                    f"width {rep}: set model.image_projection=true or embed_dim=None"
                )


def normalize(z: jax.Array) -> jax.Array:
    """``z / (||z|| + 1e-8)`` per row, as the reference."""
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


class LiT(nnx.Module):
    """``model(images, tokens) -> (zimg, ztxt)``, both ``[B, D]`` and L2-normalised.

    ``model.temperature`` is ``exp(t)``; ``model.bias`` exists for the sigmoid loss.
    """

    def __init__(self, config: LiTConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        self.image = family(c.image_family).Model(c.image, rngs=rngs)
        width = self.image.representation_size
        embed_dim = c.embed_dim or width
        self.image_proj = nnx.Linear(width, embed_dim, rngs=rngs) if c.image_projection else None
        self.text = TextTransformer(c.text, embed_dim, rngs=rngs)
        self.t = nnx.Param(jnp.full((1,), math.log(c.temperature_init), jnp.float32))
        self.b = (
            nnx.Param(jnp.full((1,), c.bias_init, jnp.float32)) if c.loss == "sigmoid" else None
        )

    @property
    def temperature(self) -> jax.Array:
        return jnp.exp(self.t[...])[0]

    @property
    def bias(self) -> jax.Array:
        if self.b is None:
            raise ValueError("only model.loss='sigmoid' has a bias")
        return self.b[...][0]

    def embed_images(self, images, *, deterministic=True, rngs=None) -> jax.Array:
        """Normalised image embeddings; a locked tower runs deterministically, without
        gradient."""
        if self.config.locked:
            z = jax.lax.stop_gradient(self.image.representation(images, deterministic=True))
        else:
            z = self.image.representation(images, deterministic=deterministic, rngs=rngs)
        if self.image_proj is not None:
            z = self.image_proj(z)
        return normalize(z.astype(jnp.float32))

    def embed_texts(self, tokens, *, deterministic=True, rngs=None) -> jax.Array:
        """Normalised text embeddings of ``int [B, max_len]`` tokens."""
        return normalize(self.text(tokens, deterministic=deterministic, rngs=rngs))

    def __call__(self, images, tokens, *, deterministic=True, rngs=None):
        zimg = self.embed_images(images, deterministic=deterministic, rngs=rngs)
        return zimg, self.embed_texts(tokens, deterministic=deterministic, rngs=rngs)


def zero_shot_classifier(model: LiT, class_tokens: jax.Array) -> jax.Array:
    """``[C, D]`` class embeddings from ``int [C, T, max_len]`` tokens (``T`` prompt templates
    per class): each class's template embeddings averaged, then re-normalised (CLIP's
    prompt ensembling)."""
    c, t, length = class_tokens.shape
    z = model.embed_texts(class_tokens.reshape(c * t, length)).reshape(c, t, -1)
    return normalize(jnp.mean(z, axis=1))


def zero_shot_logits(model: LiT, images, classifier: jax.Array) -> jax.Array:
    """``t * zimg @ classifier.T``: ``[B, C]`` logits (softmax of them: class probabilities)."""
    return model.temperature * model.embed_images(images) @ classifier.T
