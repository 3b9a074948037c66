"""Pictures of why a trained image classifier predicts what it does on one image.

* ViT, hybrid ViT and V-MoE: **attention rollout** (Abnar & Zuidema 2020, "Quantifying
  Attention Flow in Transformers", arXiv 2005.00928). Each layer's attention, averaged over
  heads, is mixed with the residual path and re-normalised, ``Â_l = (A_l + I) / rowsum``; the
  layers compose as ``R = Â_L ... Â_2 Â_1``. Row ``i`` of ``R`` says how much each input token
  flowed into token ``i`` at the top. A class-token model reads the class token's row over the
  patches; a mean-pooling model reads the mean of all rows.
* MLP-Mixer: the **token-mixing weights**. Each hidden unit of a block's first token-mixing
  layer weighs the patches; its weights, laid on the patch grid, are the spatial filter it
  applies (the Mixer paper's Figure 5, Tolstikhin et al. 2021, arXiv 2105.01601).

Example:
  >>> rollout = attention_rollout([w[0] for w in captured["attention"]], class_token=False)
  >>> explain_image(model, images, "explain.png", class_names=("0", "1", ...))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxlab.models.mixer import Mixer
from flaxlab.models.vit.model import ViT
from flaxlab.models.vmoe import MoeEncoderBlock, VMoE

# The registry's families whose models this module explains (``flaxlab explain``).
EXPLAINED_FAMILIES = ("vit", "vmoe", "mixer")


def rollout_matrix(attentions: Sequence[Any]) -> np.ndarray:
    """``R = Â_L ... Â_1`` (float64 ``[T, T]``, rows summing to 1) of per-layer attention
    weights, each ``[heads, T, T]`` with rows summing to 1, ordered from the first layer."""
    if not attentions:
        raise ValueError("attention rollout needs at least one layer's attention weights")
    rollout = None
    for layer, weights in enumerate(attentions):
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 3 or weights.shape[1] != weights.shape[2]:
            raise ValueError(
                f"layer {layer}'s attention has shape {weights.shape}; expected [heads, T, T]"
            )
        mixed = weights.mean(axis=0) + np.eye(weights.shape[1])
        mixed /= mixed.sum(axis=-1, keepdims=True)
        if rollout is not None and rollout.shape != mixed.shape:
            raise ValueError(f"layer {layer} has {mixed.shape[0]} tokens, not {rollout.shape[0]}")
        rollout = mixed if rollout is None else mixed @ rollout
    assert rollout is not None
    return rollout


def attention_rollout(
    attentions: Sequence[Any], *, class_token: bool, grid: tuple[int, int] | None = None
) -> np.ndarray:
    """The patches' share of the prediction, ``[grid_h, grid_w]`` (float64).

    Args:
      attentions: per layer ``[heads, T, T]`` attention weights of one image, first layer first.
      class_token: token 0 is a class token (read its row of the rollout over the patches);
        else mean pooling (the mean of the rollout's rows; the map then sums to 1).
      grid: the patch grid (default: square).
    """
    rollout = rollout_matrix(attentions)
    prefix = 1 if class_token else 0
    share = rollout[0, prefix:] if class_token else rollout.mean(axis=0)
    patches = share.shape[0]
    if grid is None:
        side = math.isqrt(patches)
        grid = (side, side)
    if grid[0] * grid[1] != patches:
        raise ValueError(f"{patches} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return share.reshape(grid)


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[grid_h, grid_w]`` map repeated (nearest neighbour) to ``size`` pixels."""
    (h, w), (gh, gw) = size, heat.shape
    if h % gh or w % gw:
        raise ValueError(f"a {gh}x{gw} map does not tile a {h}x{w} image")
    return np.repeat(np.repeat(heat, h // gh, axis=0), w // gw, axis=1)


def token_mixing_maps(kernel: Any, grid: tuple[int, int]) -> np.ndarray:
    """``[units, grid_h, grid_w]``: each hidden unit's weights over the patches, from a first
    token-mixing layer's kernel ``[patches, units]`` (patches in row-major grid order)."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"kernel of shape {kernel.shape} is not [{grid[0] * grid[1]}, units]")
    return kernel.T.reshape(-1, *grid)


def mixer_grid(model: Mixer) -> tuple[int, int]:
    c = model.config
    return c.image_size[0] // c.patch_size[0], c.image_size[1] // c.patch_size[1]


def mixer_token_mixing(model: Mixer, blocks: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """``{block: [units, grid_h, grid_w]}`` for ``blocks`` (default: up to four, spread over
    the depth, first and last included)."""
    count = len(model.blocks)
    if blocks is None:
        blocks = sorted({round(i * (count - 1) / 3) for i in range(min(count, 4))})
    bad = [b for b in blocks if not 0 <= b < count]
    if bad:
        raise ValueError(f"Mixer blocks {bad} do not exist; accepted: 0..{count - 1}")
    grid = mixer_grid(model)
    return {
        b: token_mixing_maps(model.blocks[b].token_mixing.fc1.kernel[...], grid) for b in blocks
    }


def tile_maps(maps: np.ndarray, max_units: int = 64) -> np.ndarray:
    """The first ``max_units`` of ``[units, h, w]`` maps tiled in a near-square mosaic, each
    scaled to ``max |w| = 1``, separated by one-pixel NaN gaps (drawn as background)."""
    maps = np.asarray(maps, np.float64)[:max_units]
    scale = np.abs(maps).max(axis=(1, 2), keepdims=True)
    maps = maps / np.where(scale > 0, scale, 1.0)
    units, h, w = maps.shape
    cols = math.ceil(math.sqrt(units))
    rows = math.ceil(units / cols)
    mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for k in range(units):
        r, c = divmod(k, cols)
        mosaic[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = maps[k]
    return mosaic


def vit_attentions(model: ViT, images) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(logits [B, classes], per block attention weights [B, heads, T, T])`` of a ViT, a
    hybrid or a V-MoE (whose blocks are walked with its evaluation routing)."""
    if not isinstance(model, VMoE):
        logits, captured = model(images, capture=("attention",))
        return np.asarray(logits), [np.asarray(w) for w in captured["attention"]]
    moe, encoder = model.config.moe, model.encoder
    x = model.embed(images)
    routing: dict[str, Any] = dict(
        capacity_factor=moe.eval_capacity_factor,
        group_size=math.gcd(x.shape[0], moe.group_images) * x.shape[1],
    )
    attentions = []
    for block in encoder.blocks:  # type: ignore[attr-defined]
        attentions.append(np.asarray(block.attn(block.norm1(x), return_weights=True)[1]))
        x = block(x, **routing)[0] if isinstance(block, MoeEncoderBlock) else block(x)
    logits = model.head(model.pool(encoder.encoder_norm(x)))  # type: ignore[attr-defined]
    return np.asarray(logits, np.float32), attentions


def _display(images) -> np.ndarray:
    """The model's input ``[H, W, C]`` in [-1, 1] as an image in [0, 1] (grey: ``[H, W]``)."""
    image = np.clip((np.asarray(images[0], np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return image[..., 0] if image.shape[-1] == 1 else image


def _frame(ax, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _show(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _frame(ax, title)


def _save(fig, output: str | Path) -> Path:
    """Writes the figure atomically (a failed write leaves an older PNG as it was)."""
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(output)
    return output


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_rollout_png(
    images, heat: np.ndarray, output: str | Path, *, caption: str, layers: int, read: str
) -> Path:
    """Input image, the rollout on the patch grid (``read``: which rows of it), and the
    rollout over the image."""
    plt = _pyplot()
    image = _display(images)
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
    _show(axes[0], image, "input")
    shown = axes[1].imshow(heat, cmap="inferno", interpolation="nearest")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    _frame(axes[1], f"attention rollout, {read} ({layers} layers)")
    _show(axes[2], image, "rollout over the input")
    axes[2].imshow(
        upsample(heat, image.shape[:2]), cmap="inferno", alpha=0.55, interpolation="nearest"
    )
    fig.suptitle(caption, fontsize=12)
    fig.tight_layout()
    return _save(fig, output)


def write_mixer_png(
    images, maps: dict[int, np.ndarray], output: str | Path, *, caption: str, max_units: int = 64
) -> Path:
    """Input image, then per block its token-mixing units' weights on the patch grid
    (red positive, blue negative, each unit scaled to its largest weight)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.6))
    _show(axes[0], _display(images), "input")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.35")  # grey gaps: white is 0 here
    for ax, (block, block_maps) in zip(axes[1:], maps.items()):
        mosaic = tile_maps(block_maps, max_units)
        ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        units = min(len(block_maps), max_units)
        _frame(ax, f"block {block}: {units} of {len(block_maps)} units")
    fig.suptitle(caption + "; token-mixing weights over the patch grid", fontsize=12)
    fig.tight_layout()
    return _save(fig, output)


def explain_image(
    model, images, output: str | Path, *, class_names: Sequence[str] | None = None
) -> tuple[Path, int, float, str]:
    """Writes the PNG explaining ``model``'s prediction on ``images`` (``[1, H, W, C]`` in
    [-1, 1], as the model reads them): attention rollout for a ViT, hybrid or V-MoE, the
    token-mixing weights for a Mixer.

    Returns:
      ``(path, predicted class, its probability, the predicted class's name)``.
    """
    if np.shape(images)[0] != 1:
        raise ValueError(f"explain takes one image, got a batch of shape {np.shape(images)}")
    if isinstance(model, Mixer):
        logits = np.asarray(model(images))
    elif isinstance(model, ViT):
        logits, attentions = vit_attentions(model, images)
    else:
        raise ValueError(f"cannot explain a {type(model).__name__}; accepted: ViT, V-MoE, Mixer")
    shifted = np.exp(logits[0].astype(np.float64) - logits[0].max())
    probabilities = shifted / shifted.sum()
    label = int(probabilities.argmax())
    names = list(class_names or [])
    name = names[label] if label < len(names) else str(label)
    caption = f"predicted {name} ({100 * probabilities[label]:.1f}%)"
    if isinstance(model, Mixer):
        path = write_mixer_png(images, mixer_token_mixing(model), output, caption=caption)
    else:
        c = model.config
        token = c.classifier == "token"
        heat = attention_rollout([w[0] for w in attentions], class_token=token, grid=c.grid_size)
        read = "class token" if token else "mean of tokens"
        path = write_rollout_png(
            images, heat, output, caption=caption, layers=len(attentions), read=read
        )
    return path, label, float(probabilities[label]), name
