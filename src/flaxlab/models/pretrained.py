"""Loading released checkpoints in the official flat ``.npz`` layout, whatever the family.

The google-research/vision_transformer (and AugReg) checkpoints are flat ``.npz`` files keyed by
``/``-joined Linen paths. Each model class maps those arrays to its own parameter tree with a
``pretrained_params(arrays)`` method (the ViT mapping lives in ``vit/checkpoints.py``, the
Mixer's in ``mixer.py``); :func:`load_pretrained` checks the shapes and assigns them.

Fixes of the reference loader: the head is kept when its shape fits (the reference always
resets it), position embeddings resize to any grid, square or not, with or without a class
token, by ``scipy.ndimage.zoom(order=1)`` as the reference does (``jax.image.resize`` differs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import scipy.ndimage
from flax import nnx


def resize_posemb(posemb: np.ndarray, new_grid: tuple[int, int], old_grid=None, num_prefix=1):
    """Resizes ``[1, prefix + gh*gw, D]`` position embeddings to ``new_grid`` (bilinear).

    ``num_prefix`` leading tokens (the class token) are kept as they are. ``old_grid`` defaults
    to a square grid.
    """
    prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
    if old_grid is None:
        side = int(round(np.sqrt(grid.shape[0])))
        if side * side != grid.shape[0]:
            raise ValueError(
                f"cannot infer the grid of {grid.shape[0]} position embeddings; pass old_grid"
            )
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    grid = grid.reshape(*old_grid, -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = np.asarray(scipy.ndimage.zoom(grid, zoom, order=1)).reshape(1, -1, grid.shape[-1])
    return np.concatenate([prefix, grid], axis=1).astype(posemb.dtype)


def dense_params(arrays, key):
    return {"kernel": arrays[f"{key}/kernel"], "bias": arrays[f"{key}/bias"]}


def norm_params(arrays, key):
    return {"scale": arrays[f"{key}/scale"], "bias": arrays[f"{key}/bias"]}


def count_blocks(arrays, pattern: str) -> int:
    """Number of blocks ``0..n-1`` whose keys match ``pattern`` (one integer group)."""
    found = {int(m.group(1)) for k in arrays for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def read_npz(checkpoint) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (path) or a mapping of arrays, as a dict (no pickle)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not exist")
        with np.load(checkpoint, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    return dict(checkpoint)


def load_pretrained(model: nnx.Module, checkpoint, *, reset_head: bool | None = None):
    """Loads a released ``.npz`` checkpoint (path or dict of arrays) into a model.

    Args:
      model: a model whose class maps the official layout (``pretrained_params``): a
        :class:`~flaxlab.models.vit.ViT` or :class:`~flaxlab.models.mixer.Mixer`, configured
        for the target task (image size, classes).
      checkpoint: path of the ``.npz`` file, or its arrays.
      reset_head: ``True`` keeps the model's fresh (zero) head; ``False`` requires the
        checkpoint's head; ``None`` (default) keeps the checkpoint's head when its shape fits.

    Returns:
      The model, updated in place. Position embeddings are resized to the model's grid.
    """
    mapping = getattr(model, "pretrained_params", None)
    if mapping is None:
        raise ValueError(
            f"{type(model).__name__} has no mapping from the official .npz layout; "
            "load_pretrained takes a ViT or a Mixer (V-MoE: flaxlab.models.vmoe_checkpoints)"
        )
    loaded = mapping(read_npz(checkpoint))
    assign_params(model, loaded, reset_head=reset_head)
    return model


def assign_params(model: nnx.Module, loaded: dict, *, reset_head: bool | None = None) -> None:
    """Writes a nested dict of arrays into the model's parameters, checking every shape.

    ``loaded["head"]`` follows ``reset_head`` as in :func:`load_pretrained`; every other
    parameter of the model must be present.
    """
    target = nnx.state(model, nnx.Param)
    flat_target = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(target)}
    has_head = ("head", "kernel") in flat_target
    head_shape = flat_target[("head", "kernel")].shape if has_head else None
    keep_head = reset_head is not True
    head_fits = "head" in loaded and loaded["head"]["kernel"].shape == head_shape
    if reset_head is False and has_head and not head_fits:
        got = loaded["head"]["kernel"].shape if "head" in loaded else None
        raise ValueError(
            f"the checkpoint's head has shape {got} but the model's is {head_shape}; use "
            "reset_head=None or True"
        )
    loaded = dict(loaded)
    if not (keep_head and head_fits):
        loaded.pop("head", None)
    updates = []
    for path, value in _flatten(loaded):
        if path not in flat_target:
            raise ValueError(f"checkpoint parameter {'/'.join(path)} has no place in this model")
        want = flat_target[path].shape
        if tuple(value.shape) != tuple(want):
            raise ValueError(
                f"checkpoint parameter {'/'.join(path)} has shape {tuple(value.shape)}, the "
                f"model expects {tuple(want)}; check the variant and image size"
            )
        updates.append((path, value))
    missing = set(flat_target) - {p for p, _ in updates} - {("head", "kernel"), ("head", "bias")}
    if missing:
        raise ValueError(f"the checkpoint lacks {sorted('/'.join(m) for m in missing)[:5]}")
    for path, value in updates:
        node = model
        for part in path[:-1]:
            node = node[int(part)] if isinstance(node, nnx.List) else getattr(node, part)
        variable = getattr(node, path[-1])
        variable[...] = np.asarray(value, dtype=variable[...].dtype)


def save_pretrained(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Writes a ViT or Mixer in the released ``.npz`` layout (``from_pretrained`` of the file
    rebuilds the same model with identical outputs). The file appears complete or not at all
    (written to a temporary name, then renamed)."""
    if getattr(model, "pretrained_arrays", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no official .npz layout; save_pretrained takes a ViT or "
            "a Mixer"
        )
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"save_pretrained writes an .npz file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **model.pretrained_arrays())  # type: ignore[attr-defined]
    tmp.replace(path)
    return path
