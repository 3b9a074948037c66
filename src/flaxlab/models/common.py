"""Small helpers shared by the model families."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str):
    """The computation dtype named by a config string."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype={name!r} is not supported; accepted: {list(DTYPES)}") from None


def to_pair(value, name: str) -> tuple[int, int]:
    """``16`` -> ``(16, 16)``; ``[8, 16]`` -> ``(8, 16)``."""
    if isinstance(value, int):
        return (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an int or a pair of ints") from None
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name}={value!r} must be a positive int or a pair of positive ints")
    return pair  # type: ignore[return-value]


def check_images(images, image_size: tuple[int, int], channels: int, model_name: str) -> None:
    """Raises a ValueError naming both shapes when images do not fit the model."""
    expected = (*image_size, channels)
    if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{model_name} expects images of shape [batch, {expected[0]}, {expected[1]}, "
            f"{expected[2]}] (NHWC), got shape {tuple(getattr(images, 'shape', ()))}"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"{model_name} expects floating-point images scaled to [-1, 1], got dtype "
            f"{images.dtype}; convert uint8 pixels with flaxlab.data.to_float_images"
        )


def parse_variant(name: str, sizes: dict, patches, family: str, *, any_patch: bool = False):
    """``"B/16"`` -> ``(sizes["B"], 16)``; a clear error naming the accepted variants.

    ``patches`` are the accepted patch sizes (with ``any_patch``, only examples for the message).
    """
    try:
        size, patch = name.split("/")
        dims, patch = sizes[size], int(patch)
        if not any_patch and patch not in patches:
            raise KeyError(patch)
    except (ValueError, KeyError):
        names = [f"{s}/{p}" for s in sizes for p in patches]
        accepted = "accepted e.g." if any_patch else "accepted"
        raise ValueError(f"unknown {family} variant {name!r}; {accepted}: {names}") from None
    return dims, patch
