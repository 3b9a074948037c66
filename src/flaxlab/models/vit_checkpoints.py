"""Loading the officially released ViT and MLP-Mixer checkpoints (``.npz``).

The google-research/vision_transformer (and AugReg) checkpoints are flat ``.npz`` files keyed by
``/``-joined Linen paths: ``embedding/kernel``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_<i>/LayerNorm_0``,
``MultiHeadDotProductAttention_1/{query,key,value,out}``, ``LayerNorm_2``,
``MlpBlock_3/Dense_{0,1}``, ``Transformer/encoder_norm``, ``pre_logits``, ``head``; Mixer's are
``stem``, ``MixerBlock_<i>/{LayerNorm_0,token_mixing,LayerNorm_1,channel_mixing}/Dense_{0,1}``,
``pre_head_layer_norm``, ``head``. Attention kernels there are per head (``[D, heads, d]`` and
``[heads, d, D]``); flaxlab's are ``[D, D]``.

Fixes of the reference loader: the head is kept when its shape fits (the reference always
resets it), position embeddings resize to any grid, square or not, with or without a class
token, by ``scipy.ndimage.zoom(order=1)`` as the reference does (``jax.image.resize`` differs).
"""

from __future__ import annotations

import os
import re

import numpy as np
import scipy.ndimage
from flax import nnx

VIT_BLOCK = "Transformer/encoderblock_{i}/"
MIXER_BLOCK = "MixerBlock_{i}/"


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
    grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, -1, grid.shape[-1])
    return np.concatenate([prefix, grid], axis=1).astype(posemb.dtype)


def _dense(arrays, key):
    return {"kernel": arrays[f"{key}/kernel"], "bias": arrays[f"{key}/bias"]}


def _norm(arrays, key):
    return {"scale": arrays[f"{key}/scale"], "bias": arrays[f"{key}/bias"]}


def _count_blocks(arrays, pattern: str) -> int:
    found = {int(m.group(1)) for k in arrays for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def vit_params_from_npz(arrays: dict[str, np.ndarray]) -> dict:
    """The reference ViT's flat arrays as a flaxlab ViT parameter tree (nested dicts)."""
    if any("conv_root" in k for k in arrays):
        raise ValueError("hybrid (ResNet + ViT) checkpoints are not supported; use a pure ViT")
    hidden = arrays["embedding/kernel"].shape[-1]
    blocks = []
    for i in range(_count_blocks(arrays, r"Transformer/encoderblock_(\d+)/")):
        b = VIT_BLOCK.format(i=i)
        attn = {}
        for name in ("query", "key", "value"):
            attn[name] = {
                "kernel": arrays[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"].reshape(
                    hidden, hidden
                ),
                "bias": arrays[f"{b}MultiHeadDotProductAttention_1/{name}/bias"].reshape(hidden),
            }
        attn["out"] = {
            "kernel": arrays[f"{b}MultiHeadDotProductAttention_1/out/kernel"].reshape(
                hidden, hidden
            ),
            "bias": arrays[f"{b}MultiHeadDotProductAttention_1/out/bias"],
        }
        blocks.append(
            {
                "norm1": _norm(arrays, f"{b}LayerNorm_0"),
                "attn": attn,
                "norm2": _norm(arrays, f"{b}LayerNorm_2"),
                "mlp": {
                    "fc1": _dense(arrays, f"{b}MlpBlock_3/Dense_0"),
                    "fc2": _dense(arrays, f"{b}MlpBlock_3/Dense_1"),
                },
            }
        )
    params = {
        "embedding": _dense(arrays, "embedding"),
        "posemb": arrays["Transformer/posembed_input/pos_embedding"],
        "encoder": {
            "blocks": dict(enumerate(blocks)),
            "encoder_norm": _norm(arrays, "Transformer/encoder_norm"),
        },
        "head": _dense(arrays, "head"),
    }
    if "cls" in arrays:
        params["cls"] = arrays["cls"]
    if "pre_logits/kernel" in arrays:
        params["pre_logits"] = _dense(arrays, "pre_logits")
    return params


def mixer_params_from_npz(arrays: dict[str, np.ndarray]) -> dict:
    """The reference Mixer's flat arrays as a flaxlab Mixer parameter tree."""
    blocks = {}
    for i in range(_count_blocks(arrays, r"MixerBlock_(\d+)/")):
        b = MIXER_BLOCK.format(i=i)
        blocks[i] = {
            "norm1": _norm(arrays, f"{b}LayerNorm_0"),
            "token_mixing": {
                "fc1": _dense(arrays, f"{b}token_mixing/Dense_0"),
                "fc2": _dense(arrays, f"{b}token_mixing/Dense_1"),
            },
            "norm2": _norm(arrays, f"{b}LayerNorm_1"),
            "channel_mixing": {
                "fc1": _dense(arrays, f"{b}channel_mixing/Dense_0"),
                "fc2": _dense(arrays, f"{b}channel_mixing/Dense_1"),
            },
        }
    return {
        "stem": _dense(arrays, "stem"),
        "blocks": blocks,
        "pre_head_norm": _norm(arrays, "pre_head_layer_norm"),
        "head": _dense(arrays, "head"),
    }


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def load_pretrained(model: nnx.Module, checkpoint, *, reset_head: bool | None = None):
    """Loads a released ``.npz`` checkpoint (path or dict of arrays) into a ViT or Mixer.

    Args:
      model: a :class:`~flaxlab.models.vit.ViT` or :class:`~flaxlab.models.mixer.Mixer`
        configured for the target task (image size, classes).
      checkpoint: path of the ``.npz`` file, or its arrays.
      reset_head: ``True`` keeps the model's fresh (zero) head; ``False`` requires the
        checkpoint's head; ``None`` (default) keeps the checkpoint's head when its shape fits.

    Returns:
      The model, updated in place. Position embeddings are resized to the model's grid.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        with np.load(checkpoint, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        arrays = dict(checkpoint)
    is_mixer = "stem/kernel" in arrays
    loaded = mixer_params_from_npz(arrays) if is_mixer else vit_params_from_npz(arrays)
    target = nnx.state(model, nnx.Param)
    flat_target = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(target)}
    if not is_mixer:
        grid = model.config.grid_size
        prefix = 1 if "cls" in loaded else 0
        loaded["posemb"] = resize_posemb(loaded["posemb"], grid, num_prefix=prefix)
    keep_head = reset_head is not True
    head_fits = loaded["head"]["kernel"].shape == flat_target[("head", "kernel")].shape
    if reset_head is False and not head_fits:
        raise ValueError(
            f"the checkpoint's head has shape {loaded['head']['kernel'].shape} but the model's "
            f"is {flat_target[('head', 'kernel')].shape}; use reset_head=None or True"
        )
    if not (keep_head and head_fits):
        del loaded["head"]
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
    return model
