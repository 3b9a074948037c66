"""Vision Transformer (Dosovitskiy et al. 2020, arXiv 2010.11929).

The architecture and initialisation follow google-research/vision_transformer
(``vit_jax/models_vit.py``): a patch embedding by a stride-P convolution, a learned class token,
a learned position embedding that includes the class-token slot (initialised N(0, 0.02)), a
pre-LN encoder, an optional ``pre_logits`` representation layer (Dense + tanh) and a
zero-initialised head. Inputs are NHWC images scaled to [-1, 1].

Example:
  >>> from flax import nnx
  >>> config = ViTConfig.variant("Ti/16", num_classes=10, image_size=32)
  >>> model = ViT(config, rngs=nnx.Rngs(0))
  >>> logits = model(jnp.zeros((2, 32, 32, 3)))   # [2, 10]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.models.common import check_images, parse_variant, resolve_dtype, to_pair
from flaxlab.models.pretrained import resize_posemb
from flaxlab.models.vit.checkpoints import vit_params_from_npz
from flaxlab.nn.attention import AttentionConfig
from flaxlab.nn.transformer import Encoder

# name: (hidden_size, num_layers, num_heads, mlp_dim), as in the reference's model configs.
VIT_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
VIT_PATCHES = (8, 14, 16, 32)
CLASSIFIERS = ("token", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Configuration of a :class:`ViT`. Build named variants with :meth:`variant`."""

    num_classes: int = 10
    image_size: tuple[int, int] = (224, 224)
    num_channels: int = 3
    patch_size: tuple[int, int] = (16, 16)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    classifier: str = "token"
    representation_size: int | None = None
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "image_size", to_pair(self.image_size, "image_size"))
        object.__setattr__(self, "patch_size", to_pair(self.patch_size, "patch_size"))
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        if self.classifier not in CLASSIFIERS:
            raise ValueError(
                f"classifier={self.classifier!r} is not supported; accepted: {list(CLASSIFIERS)}"
            )
        for size, patch, axis in zip(self.image_size, self.patch_size, ("height", "width")):
            if size % patch:
                raise ValueError(f"image {axis} {size} is not a multiple of the patch size {patch}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        resolve_dtype(self.dtype)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @classmethod
    def variant(cls, name: str, **overrides) -> ViTConfig:
        """A named reference variant, e.g. ``"B/16"`` (size Ti/S/B/L/H, patch 8/14/16/32)."""
        (hidden, layers, heads, mlp), patch = parse_variant(name, VIT_SIZES, VIT_PATCHES, "ViT")
        fields: dict[str, Any] = dict(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            mlp_dim=mlp,
            patch_size=(patch, patch),
        )
        fields.update(overrides)
        return cls(**fields)


class ViT(nnx.Module):
    """Vision Transformer classifier: ``model(images) -> logits``."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype = resolve_dtype(c.dtype)
        self.embedding = nnx.Conv(
            c.num_channels,
            c.hidden_size,
            kernel_size=c.patch_size,
            strides=c.patch_size,
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        num_tokens = c.grid_size[0] * c.grid_size[1]
        if c.classifier == "token":
            self.cls = nnx.Param(jnp.zeros((1, 1, c.hidden_size)))
            num_tokens += 1
        self.posemb = nnx.Param(
            nnx.initializers.normal(stddev=0.02)(rngs.params(), (1, num_tokens, c.hidden_size))
        )
        self.dropout = nnx.Dropout(c.dropout_rate)
        self.encoder = self.make_encoder(rngs)
        if c.representation_size is not None:
            self.pre_logits = nnx.Linear(c.hidden_size, c.representation_size, rngs=rngs)
        head_in = c.representation_size or c.hidden_size
        self.head = nnx.Linear(
            head_in, c.num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )

    def make_encoder(self, rngs: nnx.Rngs) -> nnx.Module:
        """The transformer stack; V-MoE overrides this to insert expert layers."""
        c = self.config
        return Encoder(
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.mlp_dim,
            dropout_rate=c.dropout_rate,
            drop_path_rate=c.drop_path_rate,
            attention=c.attention,
            dtype=resolve_dtype(c.dtype),
            rngs=rngs,
        )

    def embed(self, images, *, deterministic=True, rngs=None):
        """Patch embedding + class token + position embedding: ``[B, tokens, hidden]``."""
        c = self.config
        check_images(images, c.image_size, c.num_channels, type(self).__name__)
        x = self.embedding(images)
        x = x.reshape(x.shape[0], -1, c.hidden_size)
        if c.classifier == "token":
            cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, c.hidden_size)).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.posemb[...].astype(x.dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)

    def pool(self, x):
        """Token or mean pooling, then the optional ``pre_logits`` layer."""
        x = x[:, 0] if self.config.classifier == "token" else x.mean(axis=1)
        if self.config.representation_size is not None:
            x = jnp.tanh(self.pre_logits(x))
        return x

    def pretrained_params(self, arrays: dict) -> dict:
        """This model's parameter tree from the official ``.npz`` arrays, the position
        embedding resized to this model's grid (``scipy.ndimage.zoom(order=1)``)."""
        params = vit_params_from_npz(arrays)
        prefix = 1 if "cls" in params else 0
        params["posemb"] = resize_posemb(params["posemb"], self.config.grid_size, num_prefix=prefix)
        return params

    def __call__(self, images, *, deterministic=True, rngs=None):
        x = self.embed(images, deterministic=deterministic, rngs=rngs)
        x = self.encoder(x, deterministic=deterministic, rngs=rngs)
        return self.head(self.pool(x)).astype(jnp.float32)


def count_parameters(model: nnx.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
