"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601).

As google-research/vision_transformer ``vit_jax/models_mixer.py``: a stride-P convolution stem,
blocks of token mixing (an MLP across patches) and channel mixing (an MLP across features), each
after a LayerNorm and with a residual, a final LayerNorm, global average pooling and a
zero-initialised head. Inputs are NHWC images scaled to [-1, 1].

Example:
  >>> config = MixerConfig.variant("B/16", num_classes=10)
  >>> model = Mixer(config, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlab.models.classification import ClassificationTask
from flaxlab.models.common import check_images, parse_variant, resolve_dtype, to_pair
from flaxlab.models.pretrained import (
    assign_params,
    count_blocks,
    dense_params,
    load_pretrained,
    norm_params,
    read_npz,
)
from flaxlab.nn.layers_scan import check_remat, run_blocks
from flaxlab.nn.transformer import LAYERNORM_EPSILON, drop_path, gelu

# name: (hidden_size, num_blocks, tokens_mlp_dim, channels_mlp_dim), as in the reference.
MIXER_SIZES = {
    "S": (512, 8, 256, 2048),
    "B": (768, 12, 384, 3072),
    "L": (1024, 24, 512, 4096),
}
MIXER_PATCHES = (16, 32)
MIXER_BLOCK = "MixerBlock_{i}/"


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Configuration of a :class:`Mixer`. Build named variants with :meth:`variant`.

    ``remat`` and ``scan_layers``: per-block rematerialisation and one ``jax.lax.scan`` over
    the blocks, as :class:`~flaxlab.models.vit.ViTConfig`'s.
    """

    num_classes: int = 10
    image_size: tuple[int, int] = (224, 224)
    num_channels: int = 3
    patch_size: tuple[int, int] = (16, 16)
    hidden_size: int = 768
    num_blocks: int = 12
    tokens_mlp_dim: int = 384
    channels_mlp_dim: int = 3072
    drop_path_rate: float = 0.0
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image_size", to_pair(self.image_size, "image_size"))
        object.__setattr__(self, "patch_size", to_pair(self.patch_size, "patch_size"))
        for size, patch, axis in zip(self.image_size, self.patch_size, ("height", "width")):
            if size % patch:
                raise ValueError(f"image {axis} {size} is not a multiple of the patch size {patch}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        resolve_dtype(self.dtype)
        check_remat(self.remat)

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (
            self.image_size[1] // self.patch_size[1]
        )

    @classmethod
    def variant(cls, name: str, **overrides) -> MixerConfig:
        """A named reference variant, e.g. ``"B/16"`` (size S/B/L, patch 16/32)."""
        dims, patch = parse_variant(name, MIXER_SIZES, MIXER_PATCHES, "Mixer")
        hidden, blocks, tokens_mlp, channels_mlp = dims
        fields: dict[str, Any] = dict(
            hidden_size=hidden,
            num_blocks=blocks,
            tokens_mlp_dim=tokens_mlp,
            channels_mlp_dim=channels_mlp,
            patch_size=(patch, patch),
        )
        fields.update(overrides)
        return cls(**fields)


class MixerMlp(nnx.Module):
    """Dense -> GELU -> Dense (no dropout, as the reference)."""

    def __init__(self, features: int, mlp_dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(features, mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, features, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class MixerBlock(nnx.Module):
    """x + TokenMLP(LN(x)^T)^T; x + ChannelMLP(LN(x))."""

    def __init__(self, config: MixerConfig, drop_path_rate: float, *, rngs: nnx.Rngs):
        c, dtype = config, resolve_dtype(config.dtype)
        self.norm1 = nnx.LayerNorm(c.hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)
        self.token_mixing = MixerMlp(c.num_patches, c.tokens_mlp_dim, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(c.hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)
        self.channel_mixing = MixerMlp(c.hidden_size, c.channels_mlp_dim, dtype=dtype, rngs=rngs)
        self.drop_path_rate = drop_path_rate

    def __call__(self, x, *, deterministic=True, rngs=None, drop_path_rate=None):
        """``drop_path_rate`` overrides the block's own (a layer scan passes each block's)."""
        kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        y = self.token_mixing(jnp.swapaxes(self.norm1(x), 1, 2))
        x = x + drop_path(jnp.swapaxes(y, 1, 2), rate, **kw)
        return x + drop_path(self.channel_mixing(self.norm2(x)), rate, **kw)


class Mixer(nnx.Module):
    """MLP-Mixer classifier: ``model(images) -> logits``."""

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        dtype = resolve_dtype(c.dtype)
        self.stem = nnx.Conv(
            c.num_channels,
            c.hidden_size,
            kernel_size=c.patch_size,
            strides=c.patch_size,
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        self.blocks = nnx.List(
            [
                MixerBlock(c, c.drop_path_rate * i / max(c.num_blocks - 1, 1), rngs=rngs)
                for i in range(c.num_blocks)
            ]
        )
        self.pre_head_norm = nnx.LayerNorm(c.hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)
        self.head = nnx.Linear(
            c.hidden_size, c.num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )

    def pretrained_params(self, arrays: dict) -> dict:
        """This model's parameter tree from the official ``.npz`` arrays (the reference's keys:
        ``stem``, ``MixerBlock_<i>/{LayerNorm_0,token_mixing,LayerNorm_1,channel_mixing}``,
        ``pre_head_layer_norm``, ``head``)."""
        return mixer_params_from_npz({k.removeprefix("params/"): v for k, v in arrays.items()})

    def pretrained_arrays(self) -> dict:
        """This model's parameters in the reference's ``.npz`` layout."""
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(self, nnx.Param)))
        return mixer_params_to_npz(params)

    @classmethod
    def from_pretrained(cls, path, *, num_classes: int | None = None, **overrides) -> Mixer:
        """The Mixer a released ``.npz`` checkpoint describes, with its weights.

        The token-mixing MLP fixes the number of patches, so the image size is the
        checkpoint's (a Mixer cannot change resolution without retraining that MLP).

        Args:
          path: the ``.npz`` file (or a dict of its arrays).
          num_classes: a new, zero-initialised head of this many classes (default: the
            checkpoint's).
          **overrides: other :class:`MixerConfig` fields (``dtype``, ``drop_path_rate``...).
        """
        arrays = {k.removeprefix("params/"): v for k, v in read_npz(path).items()}
        fields = mixer_config_fields(arrays)
        if num_classes is not None:
            fields["num_classes"] = num_classes
        elif "num_classes" not in fields:
            raise ValueError("the checkpoint has no head: pass num_classes")
        if "image_size" in overrides and tuple(overrides["image_size"]) != fields["image_size"]:
            raise ValueError(
                f"image_size={overrides['image_size']}: a Mixer runs at its checkpoint's "
                f"resolution {fields['image_size']} (the token-mixing MLP fixes the patches)"
            )
        fields.update(overrides)
        model = cls(MixerConfig(**fields), rngs=nnx.Rngs(0))
        assign_params(model, model.pretrained_params(arrays))
        return model

    @property
    def representation_size(self) -> int:
        """Width of :meth:`representation` (the hidden size)."""
        return self.config.hidden_size

    def representation(self, images, *, deterministic=True, rngs=None):
        """The pooled features the head reads: ``[B, hidden]``."""
        c = self.config
        check_images(images, c.image_size, c.num_channels, "Mixer")
        x = self.stem(images)
        x = x.reshape(x.shape[0], -1, c.hidden_size)

        def call(block, x, rngs, **overrides):
            return block(x, deterministic=deterministic, rngs=rngs, **overrides), None

        x, _ = run_blocks(
            self.blocks,
            x,
            call,
            rngs=rngs,
            remat=c.remat,
            scan=c.scan_layers,
            varying=("drop_path_rate",),
            owner="Mixer",
        )
        return self.pre_head_norm(x).mean(axis=1)

    def __call__(self, images, *, deterministic=True, rngs=None):
        x = self.representation(images, deterministic=deterministic, rngs=rngs)
        return self.head(x).astype(jnp.float32)


def mixer_params_from_npz(arrays: dict[str, np.ndarray]) -> dict:
    """The reference Mixer's flat arrays as a flaxlab Mixer parameter tree."""
    blocks = {}
    for i in range(count_blocks(arrays, r"MixerBlock_(\d+)/")):
        b = MIXER_BLOCK.format(i=i)
        blocks[i] = {
            "norm1": norm_params(arrays, f"{b}LayerNorm_0"),
            "token_mixing": {
                "fc1": dense_params(arrays, f"{b}token_mixing/Dense_0"),
                "fc2": dense_params(arrays, f"{b}token_mixing/Dense_1"),
            },
            "norm2": norm_params(arrays, f"{b}LayerNorm_1"),
            "channel_mixing": {
                "fc1": dense_params(arrays, f"{b}channel_mixing/Dense_0"),
                "fc2": dense_params(arrays, f"{b}channel_mixing/Dense_1"),
            },
        }
    params = {
        "stem": dense_params(arrays, "stem"),
        "blocks": blocks,
        "pre_head_norm": norm_params(arrays, "pre_head_layer_norm"),
    }
    if "head/kernel" in arrays:
        params["head"] = dense_params(arrays, "head")
    return params


# flaxlab's module names -> the reference's, per block.
_BLOCK_NAMES = {
    "norm1": "LayerNorm_0",
    "norm2": "LayerNorm_1",
    "token_mixing": "token_mixing",
    "channel_mixing": "channel_mixing",
}


def mixer_params_to_npz(params: dict) -> dict[str, np.ndarray]:
    """A flaxlab Mixer's parameter tree in the reference's ``.npz`` layout (the inverse of
    :func:`mixer_params_from_npz`)."""
    out: dict[str, np.ndarray] = {}

    def put(key, layer):
        for name, value in layer.items():
            out[f"{key}/{name}"] = np.asarray(value)

    put("stem", params["stem"])
    put("pre_head_layer_norm", params["pre_head_norm"])
    if "head" in params:
        put("head", params["head"])
    for i, block in params["blocks"].items():
        for ours, theirs in _BLOCK_NAMES.items():
            key = MIXER_BLOCK.format(i=i) + theirs
            if ours.endswith("mixing"):
                put(f"{key}/Dense_0", block[ours]["fc1"])
                put(f"{key}/Dense_1", block[ours]["fc2"])
            else:
                put(key, block[ours])
    return out


def mixer_config_fields(arrays: dict[str, np.ndarray]) -> dict:
    """The :class:`MixerConfig` fields a checkpoint's arrays imply (square token grid)."""
    kh, kw, channels, hidden = arrays["stem/kernel"].shape
    block = MIXER_BLOCK.format(i=0)
    tokens, tokens_mlp = arrays[f"{block}token_mixing/Dense_0/kernel"].shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"the checkpoint mixes {tokens} tokens, not a square grid")
    fields = dict(
        image_size=(side * kh, side * kw),
        num_channels=channels,
        patch_size=(kh, kw),
        hidden_size=hidden,
        num_blocks=count_blocks(arrays, r"MixerBlock_(\d+)/"),
        tokens_mlp_dim=tokens_mlp,
        channels_mlp_dim=arrays[f"{block}channel_mixing/Dense_0/kernel"].shape[1],
    )
    if "head/kernel" in arrays:
        fields["num_classes"] = arrays["head/kernel"].shape[1]
    return fields


def config_from_checkpoint(
    path, base: MixerConfig, *, num_classes: int | None = None
) -> MixerConfig:
    """The config of the Mixer a released ``.npz`` describes, with ``base``'s dtype,
    stochastic depth, remat and layer scan, and ``num_classes`` (default: the checkpoint's,
    else ``base``'s)."""
    arrays = {k.removeprefix("params/"): v for k, v in read_npz(path).items()}
    fields = mixer_config_fields(arrays)
    fields.update(
        dtype=base.dtype,
        drop_path_rate=base.drop_path_rate,
        remat=base.remat,
        scan_layers=base.scan_layers,
    )
    fields["num_classes"] = num_classes or fields.get("num_classes") or base.num_classes
    return MixerConfig(**fields)


# The family of the model registry.
Config = MixerConfig
Model = Mixer
Task = ClassificationTask
__all__ = [
    "Config",
    "Mixer",
    "MixerConfig",
    "Model",
    "Task",
    "config_from_checkpoint",
    "load_pretrained",
    "mixer_config_fields",
    "mixer_params_from_npz",
    "mixer_params_to_npz",
]
