"""The ResNet stem of the hybrid ViTs (R50+ViT-B/16, R26+ViT-S/32, R+ViT-Ti/16, ...).

The architecture follows google-research/vision_transformer (``vit_jax/models_resnet.py`` and
the hybrid root in ``vit_jax/models_vit.py``), a BiT-style ResNet v1.5 with:

- weight-standardised convolutions without bias (:class:`StdConv`): the kernel is centred and
  divided by ``std + 1e-5`` per output channel, the statistics taken over ``(kh, kw, in)``;
- GroupNorm with 32 groups and epsilon 1e-6 (the Linen default) after every convolution; the
  last norm of each bottleneck unit (``gn3``) starts with a zero scale;
- TF/XLA ``SAME`` padding everywhere (an odd total pad puts the extra row/column at the
  bottom/right), including the 3x3 stride-2 max-pool of the root;
- a root (``conv_root`` 7x7/2 with ``64 * width_factor`` features, ``gn_root``, ReLU, max-pool)
  and stages ``block1..blockN`` of bottleneck units ``unit1..unitK``. Stage ``i`` (0-based) has
  ``64 * width_factor * 2**i`` bottleneck features and ``4x`` that at its output; its first
  unit has stride 1 (first stage) or 2 (later stages) on the 3x3 convolution ``conv2`` and on
  the ``conv_proj``/``gn_proj`` projection, which exists where the channels or the stride
  change.

The parameter tree maps 1:1 to the reference's names (``conv_root/kernel``, ``gn_root/scale``,
``block1/unit1/conv1/kernel``, ...); :func:`resnet_params_from_npz` and
:func:`resnet_params_to_npz` convert between it and the flat ``.npz`` layout of the released
hybrid checkpoints, where these keys are at the top level.

Example:
  >>> from flax import nnx
  >>> stem = ResNetStem((3, 4, 9), 1, 3, rngs=nnx.Rngs(0))  # the R50 stem of R50+ViT-B/16
  >>> stem(jnp.zeros((1, 224, 224, 3))).shape                # (1, 14, 14, 1024)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WS_EPSILON = 1e-5  # weight standardisation: (w - mean) / (std + eps)
GN_GROUPS = 32
GN_EPSILON = 1e-6  # flax GroupNorm default, used by the reference
ROOT_FEATURES = 64
EXPANSION = 4

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def standardize_kernel(kernel, eps: float = WS_EPSILON):
    """A ``[kh, kw, in, out]`` kernel centred and scaled per output channel:
    ``(w - mean) / (std + eps)``, the population statistics over the first three axes."""
    axes = (0, 1, 2)
    kernel = kernel - jnp.mean(kernel, axis=axes, keepdims=True)
    return kernel / (jnp.std(kernel, axis=axes, keepdims=True) + eps)


def resnet_width(width_factor: float) -> int:
    """Features of the root convolution (and bottleneck features of the first stage)."""
    return int(ROOT_FEATURES * width_factor)


def resnet_downsampling(num_layers: Sequence[int]) -> int:
    """Total stride of a stem with ``len(num_layers)`` stages: 4 for the root (convolution and
    max-pool), times 2 for every stage after the first."""
    return 4 * 2 ** max(len(num_layers) - 1, 0)


def resnet_out_channels(num_layers: Sequence[int], width_factor: float) -> int:
    """Channels of the stem's output: the root's width without stages, else ``4x`` the last
    stage's bottleneck features."""
    width = resnet_width(width_factor)
    if not num_layers:
        return width
    return EXPANSION * width * 2 ** (len(num_layers) - 1)


def _max_pool_same(x):
    """3x3 stride-2 max-pool with TF ``SAME`` padding (pads hold -inf, as Linen's max_pool)."""
    init = jnp.array(-jnp.inf, dtype=x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def _group_norm(features: int, dtype, rngs: nnx.Rngs, *, zero_scale: bool = False):
    scale_init = nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init()
    return nnx.GroupNorm(
        features,
        num_groups=GN_GROUPS,
        epsilon=GN_EPSILON,
        dtype=dtype,
        scale_init=scale_init,
        rngs=rngs,
    )


class StdConv(nnx.Module):
    """A bias-free 2-D convolution (NHWC, ``SAME`` padding) of a weight-standardised kernel.

    The stored ``kernel`` (``[kh, kw, in, out]``, LeCun-normal initialised) is standardised by
    :func:`standardize_kernel` in its parameter dtype on every call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        strides: int = 1,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, jnp.float32))
        self.strides = (strides, strides)
        self.dtype = dtype

    def __call__(self, x):
        kernel = standardize_kernel(self.kernel[...])
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        return jax.lax.conv_general_dilated(
            x.astype(dtype),
            kernel.astype(dtype),
            window_strides=self.strides,
            padding="SAME",
            dimension_numbers=_DIMENSIONS,
        )


class ResidualUnit(nnx.Module):
    """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (``4 * features``), GroupNorm after each,
    plus a strided 1x1 projection of the input where the channels or the stride change."""

    def __init__(
        self, in_features: int, features: int, strides: int = 1, *, dtype=None, rngs: nnx.Rngs
    ):
        out = EXPANSION * features
        self.needs_projection = in_features != out or strides != 1
        if self.needs_projection:
            self.conv_proj = StdConv(in_features, out, 1, strides, dtype=dtype, rngs=rngs)
            self.gn_proj = _group_norm(out, dtype, rngs)
        self.conv1 = StdConv(in_features, features, 1, dtype=dtype, rngs=rngs)
        self.gn1 = _group_norm(features, dtype, rngs)
        self.conv2 = StdConv(features, features, 3, strides, dtype=dtype, rngs=rngs)
        self.gn2 = _group_norm(features, dtype, rngs)
        self.conv3 = StdConv(features, out, 1, dtype=dtype, rngs=rngs)
        self.gn3 = _group_norm(out, dtype, rngs, zero_scale=True)

    def __call__(self, x):
        residual = x
        if self.needs_projection:
            residual = self.gn_proj(self.conv_proj(x))
        y = nnx.relu(self.gn1(self.conv1(x)))
        y = nnx.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return nnx.relu(residual + y)


class ResNetStage(nnx.Module):
    """``num_units`` bottleneck units ``unit1..unitK``; only the first one is strided."""

    def __init__(
        self,
        in_features: int,
        num_units: int,
        features: int,
        first_stride: int,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if num_units < 1:
            raise ValueError(f"a ResNet stage needs at least one unit, got {num_units}")
        self.num_units = num_units
        for j in range(num_units):
            unit = ResidualUnit(
                in_features if j == 0 else EXPANSION * features,
                features,
                first_stride if j == 0 else 1,
                dtype=dtype,
                rngs=rngs,
            )
            setattr(self, f"unit{j + 1}", unit)

    def __call__(self, x):
        for j in range(self.num_units):
            x = getattr(self, f"unit{j + 1}")(x)
        return x


class ResNetStem(nnx.Module):
    """The hybrid ViT's ResNet stem: NHWC images ``[B, H, W, in_channels]`` to NHWC features
    ``[B, ceil(H / downsampling), ceil(W / downsampling), out_channels]``.

    Args:
      num_layers: units per stage, e.g. ``(3, 4, 9)`` (R50+ViT-B/16), ``(2, 2, 2, 2)``
        (R26+ViT-S/32), ``(3, 4, 6, 3)`` (R50+ViT-L/32) or ``()`` (root only, R+ViT-Ti/16).
      width_factor: widens every layer; the root has ``int(64 * width_factor)`` features, which
        must be a positive multiple of the 32 GroupNorm groups (``0.5`` is the smallest).
      in_channels: channels of the input images.
      dtype: computation dtype (parameters stay float32); ``None`` follows the inputs.
    """

    def __init__(
        self,
        num_layers: Sequence[int],
        width_factor: float,
        in_channels: int,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        width = resnet_width(width_factor)
        if width <= 0 or width % GN_GROUPS:
            raise ValueError(
                f"width_factor={width_factor} gives {width} root features, which is not a "
                f"positive multiple of the {GN_GROUPS} GroupNorm groups"
            )
        self.num_layers = tuple(int(n) for n in num_layers)
        self.width_factor = width_factor
        self.in_channels = in_channels
        self.conv_root = StdConv(in_channels, width, 7, 2, dtype=dtype, rngs=rngs)
        self.gn_root = _group_norm(width, dtype, rngs)
        features_in = width
        for i, num_units in enumerate(self.num_layers):
            features = width * 2**i
            stage = ResNetStage(
                features_in, num_units, features, 1 if i == 0 else 2, dtype=dtype, rngs=rngs
            )
            setattr(self, f"block{i + 1}", stage)
            features_in = EXPANSION * features

    @property
    def downsampling(self) -> int:
        """Total stride: 4 (root), times 2 per stage after the first."""
        return resnet_downsampling(self.num_layers)

    @property
    def out_channels(self) -> int:
        return resnet_out_channels(self.num_layers, self.width_factor)

    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNetStem expects NHWC images with {self.in_channels} channels, got shape "
                f"{tuple(x.shape)}"
            )
        x = nnx.relu(self.gn_root(self.conv_root(x)))
        x = _max_pool_same(x)
        for i in range(len(self.num_layers)):
            x = getattr(self, f"block{i + 1}")(x)
        return x


# ---------------------------------------------------------------------------------------------
# The released .npz layout.

_GN_NAME = re.compile(r"gn(\d+|_root|_proj)$")
_UNIT_NAMES = ("conv_proj", "gn_proj", "conv1", "gn1", "conv2", "gn2", "conv3", "gn3")


def _gn_vector(array: np.ndarray, key: str) -> np.ndarray:
    """GroupNorm ``scale``/``bias`` as ``(C,)``; older files store ``(1, 1, 1, C)``."""
    array = np.asarray(array)
    if array.ndim == 0 or any(d != 1 for d in array.shape[:-1]):
        raise ValueError(
            f"GroupNorm parameter {key} has shape {array.shape}; want (C,) or (1,..,C)"
        )
    return array.reshape(array.shape[-1])


def _layer_params(arrays, key: str) -> dict:
    name = key.rsplit("/", 1)[-1]
    if _GN_NAME.match(name):
        return {p: _gn_vector(arrays[f"{key}/{p}"], f"{key}/{p}") for p in ("scale", "bias")}
    return {"kernel": np.asarray(arrays[f"{key}/kernel"])}


def resnet_layout_from_npz(arrays, prefix: str = "") -> tuple[tuple[int, ...], float]:
    """``(num_layers, width_factor)`` of the stem stored in the flat arrays under ``prefix``."""
    key = f"{prefix}conv_root/kernel"
    if key not in arrays:
        raise ValueError(f"no ResNet stem in the arrays: {key!r} is missing")
    units: dict[int, set[int]] = {}
    pattern = re.compile(re.escape(prefix) + r"block(\d+)/unit(\d+)/")
    for k in arrays:
        m = pattern.match(k)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(units) != list(range(1, len(units) + 1)):
        raise ValueError(f"ResNet stages are not numbered block1..blockN: {sorted(units)}")
    num_layers = []
    for i in range(1, len(units) + 1):
        if sorted(units[i]) != list(range(1, len(units[i]) + 1)):
            raise ValueError(f"units of block{i} are not numbered unit1..unitK: {sorted(units[i])}")
        num_layers.append(len(units[i]))
    return tuple(num_layers), arrays[key].shape[-1] / ROOT_FEATURES


def resnet_params_from_npz(arrays, prefix: str = "") -> dict:
    """The stem's parameter tree (nested dicts of NumPy arrays, as
    ``nnx.to_pure_dict(nnx.state(stem, nnx.Param))``) from the flat ``.npz`` arrays.

    Keys are ``{prefix}conv_root/kernel``, ``{prefix}gn_root/{scale,bias}`` and
    ``{prefix}block{i}/unit{j}/{conv1,gn1,conv2,gn2,conv3,gn3,conv_proj,gn_proj}/...``; the
    released hybrid checkpoints keep them at the top level (``prefix=""``). GroupNorm
    parameters of shape ``(1, 1, 1, C)`` (older files) become ``(C,)``. Other keys are ignored.
    """
    num_layers, _ = resnet_layout_from_npz(arrays, prefix)
    params: dict = {
        "conv_root": _layer_params(arrays, f"{prefix}conv_root"),
        "gn_root": _layer_params(arrays, f"{prefix}gn_root"),
    }
    for i, num_units in enumerate(num_layers, 1):
        stage = {}
        for j in range(1, num_units + 1):
            base = f"{prefix}block{i}/unit{j}/"
            unit = {}
            for name in _UNIT_NAMES:
                if name.endswith("_proj") and f"{base}conv_proj/kernel" not in arrays:
                    continue
                unit[name] = _layer_params(arrays, base + name)
            stage[f"unit{j}"] = unit
        params[f"block{i}"] = stage
    return params


def resnet_params_to_npz(params, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of :func:`resnet_params_from_npz`: flat ``{prefix}a/b/c`` keys, NumPy
    arrays, GroupNorm ``scale``/``bias`` as ``(C,)``."""
    out: dict[str, np.ndarray] = {}

    def visit(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict):
                visit(v, (*path, str(k)))
                continue
            array = np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
            if path and _GN_NAME.match(path[-1]) and k in ("scale", "bias"):
                array = _gn_vector(array, "/".join((*path, str(k))))
            out[prefix + "/".join((*path, str(k)))] = array

    visit(params, ())
    return out
