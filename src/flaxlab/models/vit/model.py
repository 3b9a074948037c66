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
import numpy as np
from flax import nnx

from flaxlab.models.common import check_images, parse_variant, resolve_dtype, to_pair
from flaxlab.models.pretrained import assign_params, read_npz, resize_posemb
from flaxlab.models.vit.checkpoints import vit_config_fields, vit_params_from_npz, vit_params_to_npz
from flaxlab.models.vit.resnet import ResNetStem, resnet_downsampling, resnet_out_channels
from flaxlab.nn.attention import AttentionConfig
from flaxlab.nn.layers_scan import check_remat
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
# Hybrid stems by name and total patch (the reference's configs): R50 has 3 stages for /16
# (downsampling 16, then 1x1 patches) and 4 for /32.
HYBRID_STEMS = {("R50", 16): (3, 4, 9), ("R50", 32): (3, 4, 6, 3), ("R26", 32): (2, 2, 2, 2)}
CAPTURES = ("attention", "features")
POSEMB_INITS = ("normal", "sincos2d")


def posemb_sincos2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """The 2-D sine-cosine position table ``[grid_h * grid_w, dim]`` (float32), row-major over
    the patch grid, as big_vision's ``posemb_sincos_2d``: with ``q = dim / 4`` frequencies
    ``omega_k = temperature ** (-k / (q - 1))``, each row is ``[sin(x omega), cos(x omega),
    sin(y omega), cos(y omega)]`` for the patch at column ``x`` and row ``y``."""
    if dim % 4 or dim < 8:
        raise ValueError(f"posemb_sincos2d needs dim a multiple of 4 and >= 8, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / (quarter - 1))
    y, x = np.mgrid[: grid[0], : grid[1]]
    x = x.reshape(-1, 1) * omega[None]
    y = y.reshape(-1, 1) * omega[None]
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return table.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Configuration of a :class:`ViT`. Build named variants with :meth:`variant`.

    ``remat`` (``"none"``, ``"full"``, ``"dots"``, ``"dots_no_batch"``) rematerialises each
    encoder block in the backward pass; ``scan_layers`` runs the blocks with one
    ``jax.lax.scan`` (one block compiled). Neither changes the parameters or the results
    (:mod:`flaxlab.nn.layers_scan`).

    ``posemb_init`` is how the learned position embedding starts: ``"normal"`` (N(0, 0.02),
    the reference's) or ``"sincos2d"`` (:func:`posemb_sincos2d`, the fixed table of big_vision's
    "Better plain ViT baselines", here as a starting point that keeps learning; the class-token
    slot starts at zero). Checkpoints are the same either way.
    """

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
    resnet_layers: tuple[int, ...] | None = None
    resnet_width: float = 1.0
    remat: str = "none"
    scan_layers: bool = False
    posemb_init: str = "normal"

    def __post_init__(self):
        object.__setattr__(self, "image_size", to_pair(self.image_size, "image_size"))
        object.__setattr__(self, "patch_size", to_pair(self.patch_size, "patch_size"))
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        if self.classifier not in CLASSIFIERS:
            raise ValueError(
                f"classifier={self.classifier!r} is not supported; accepted: {list(CLASSIFIERS)}"
            )
        check_remat(self.remat)
        if self.posemb_init not in POSEMB_INITS:
            raise ValueError(
                f"posemb_init={self.posemb_init!r} is not supported; accepted: {list(POSEMB_INITS)}"
            )
        if self.posemb_init == "sincos2d" and (self.hidden_size % 4 or self.hidden_size < 8):
            raise ValueError(
                f"posemb_init='sincos2d' needs hidden_size a multiple of 4 and >= 8, got "
                f"{self.hidden_size}"
            )
        if self.resnet_layers is not None:
            object.__setattr__(self, "resnet_layers", tuple(int(n) for n in self.resnet_layers))
        scale = self.downsampling
        for size, patch, axis in zip(self.image_size, self.patch_size, ("height", "width")):
            if size % (patch * scale):
                raise ValueError(
                    f"image {axis} {size} is not a multiple of the patch size {patch}"
                    + (f" times the ResNet stem's downsampling {scale}" if scale > 1 else "")
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        resolve_dtype(self.dtype)

    @property
    def downsampling(self) -> int:
        """The hybrid ResNet stem's downsampling (1 without a stem)."""
        return 1 if self.resnet_layers is None else resnet_downsampling(self.resnet_layers)

    @property
    def grid_size(self) -> tuple[int, int]:
        scale = self.downsampling
        return (
            self.image_size[0] // (self.patch_size[0] * scale),
            self.image_size[1] // (self.patch_size[1] * scale),
        )

    @classmethod
    def variant(cls, name: str, **overrides) -> ViTConfig:
        """A named reference variant: ``"B/16"`` (size Ti/S/B/L/H, patch 8/14/16/32) or a
        hybrid ``"R50+B/16"``, ``"R50+L/32"``, ``"R26+S/32"`` (ResNet stem, then 1x1 patches)."""
        stem_name, _, vit_name = name.rpartition("+")
        (hidden, layers, heads, mlp), patch = parse_variant(vit_name, VIT_SIZES, VIT_PATCHES, "ViT")
        fields: dict[str, Any] = dict(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            mlp_dim=mlp,
            patch_size=(patch, patch),
        )
        if stem_name:
            if (stem_name, patch) not in HYBRID_STEMS:
                names = [f"{s}+B/{p}" for s, p in HYBRID_STEMS]
                raise ValueError(f"unknown hybrid ViT variant {name!r}; accepted e.g.: {names}")
            stem = HYBRID_STEMS[(stem_name, patch)]
            scale = resnet_downsampling(stem)
            fields.update(resnet_layers=stem, patch_size=(patch // scale, patch // scale))
        fields.update(overrides)
        return cls(**fields)


class ViT(nnx.Module):
    """Vision Transformer classifier: ``model(images) -> logits``.

    ``model(images, capture=("attention", "features"))`` also returns what it captured:
    ``{"attention": [per block [B, heads, T, T]], "features": [per block [B, T, D]]}``.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype = resolve_dtype(c.dtype)
        embed_in = c.num_channels
        if c.resnet_layers is not None:
            self.stem = ResNetStem(
                c.resnet_layers, c.resnet_width, c.num_channels, dtype=dtype, rngs=rngs
            )
            embed_in = resnet_out_channels(c.resnet_layers, c.resnet_width)
        self.embedding = nnx.Conv(
            embed_in,
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
        posemb = nnx.initializers.normal(stddev=0.02)(rngs.params(), (1, num_tokens, c.hidden_size))
        if c.posemb_init == "sincos2d":
            table = posemb_sincos2d(c.grid_size, c.hidden_size)
            prefix = num_tokens - table.shape[0]  # the class-token slot starts at zero
            posemb = jnp.pad(jnp.asarray(table), ((prefix, 0), (0, 0)))[None]
        self.posemb = nnx.Param(posemb)
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
            remat=c.remat,
            scan_layers=c.scan_layers,
            rngs=rngs,
        )

    def embed(self, images, *, deterministic=True, rngs=None):
        """Patch embedding + class token + position embedding: ``[B, tokens, hidden]``."""
        c = self.config
        check_images(images, c.image_size, c.num_channels, type(self).__name__)
        x = self.stem(images) if c.resnet_layers is not None else images
        x = self.embedding(x)
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

    @property
    def representation_size(self) -> int:
        """Width of :meth:`representation` (``pre_logits`` width, else the hidden size)."""
        return self.config.representation_size or self.config.hidden_size

    def representation(self, images, *, deterministic=True, rngs=None):
        """The pooled features the head reads (after ``pre_logits``): ``[B, width]``."""
        x = self.embed(images, deterministic=deterministic, rngs=rngs)
        x = self.encoder(x, deterministic=deterministic, rngs=rngs)
        return self.pool(x)

    def pretrained_params(self, arrays: dict) -> dict:
        """This model's parameter tree from the official ``.npz`` arrays (either naming
        generation), the position embedding resized to this model's grid
        (``scipy.ndimage.zoom(order=1)``)."""
        params = vit_params_from_npz(arrays)
        prefix = 1 if "cls" in params else 0
        params["posemb"] = resize_posemb(params["posemb"], self.config.grid_size, num_prefix=prefix)
        return params

    def pretrained_arrays(self) -> dict:
        """This model's parameters in the published ``.npz`` layout (see
        :func:`~flaxlab.models.pretrained.save_pretrained`)."""
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(self, nnx.Param)))
        return vit_params_to_npz(params, self.config.num_heads)

    @classmethod
    def from_pretrained(
        cls, path, *, image_size=None, num_classes: int | None = None, **overrides
    ) -> ViT:
        """The model a released ``.npz`` checkpoint describes, with its weights.

        Patch size, width, depth, heads, MLP width, class token or mean pooling, the
        ``pre_logits`` layer, the hybrid stem and the class count are read from the arrays.

        Args:
          path: the ``.npz`` file (or a dict of its arrays), either naming generation.
          image_size: the resolution to run at (default: the grid the position embedding
            implies); the position embedding is resized to it.
          num_classes: a new head of this many classes, zero-initialised as the reference
            fine-tunes (default: the checkpoint's head).
          **overrides: other :class:`ViTConfig` fields (``dropout_rate``, ``dtype``, ...).

        Returns:
          The model, ready for ``model(images)`` with images in [-1, 1].
        """
        arrays = read_npz(path)
        fields = vit_config_fields(arrays)
        if image_size is not None:
            fields["image_size"] = image_size
        if num_classes is not None:
            fields["num_classes"] = num_classes
        elif "num_classes" not in fields:
            raise ValueError("the checkpoint has no head: pass num_classes")
        fields.update(overrides)
        model = cls(cls.config_class(**fields), rngs=nnx.Rngs(0))
        assign_params(model, model.pretrained_params(arrays))
        return model

    config_class: type = ViTConfig

    def __call__(self, images, *, deterministic=True, rngs=None, capture=()):
        x = self.embed(images, deterministic=deterministic, rngs=rngs)
        if not capture:
            x = self.encoder(x, deterministic=deterministic, rngs=rngs)
            return self.head(self.pool(x)).astype(jnp.float32)
        unknown = set(capture) - set(CAPTURES)
        if unknown:
            raise ValueError(f"capture={tuple(capture)!r}: accepted {CAPTURES}")
        encoder = self.encoder
        if not isinstance(encoder, Encoder):
            raise ValueError(
                f"capture needs a plain transformer encoder, not {type(encoder).__name__}"
            )
        x, captured = encoder.capture(x, deterministic=deterministic, rngs=rngs)
        logits = self.head(self.pool(x)).astype(jnp.float32)
        return logits, {name: captured[name] for name in capture}


def count_parameters(model: nnx.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# Fields a fine-tuning run keeps from its own config when the model comes from a checkpoint.
RUN_FIELDS = (
    "image_size",
    "dtype",
    "dropout_rate",
    "drop_path_rate",
    "attention",
    "remat",
    "scan_layers",
)


def config_from_checkpoint(path, base: ViTConfig, *, num_classes: int | None = None) -> ViTConfig:
    """The config of the ViT a released ``.npz`` describes, with ``base``'s run settings
    (image size, dtype, dropout, stochastic depth, attention kernel, remat, layer scan) and
    ``num_classes`` (default: the checkpoint's, else ``base``'s)."""
    fields = vit_config_fields(read_npz(path))
    fields.update({name: getattr(base, name) for name in RUN_FIELDS})
    fields["num_classes"] = num_classes or fields.get("num_classes") or base.num_classes
    return type(base)(**fields) if type(base) is ViTConfig else ViTConfig(**fields)
