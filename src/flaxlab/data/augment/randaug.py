"""RandAugment: magnitude to argument, and ``num_layers`` random operations per image."""

from __future__ import annotations

import numpy as np

from flaxlab.data.augment.color import (
    autocontrast,
    brightness,
    color,
    contrast,
    equalize,
    invert,
    posterize,
    sharpness,
    solarize,
    solarize_add,
)
from flaxlab.data.augment.common import (
    MAX_LEVEL,
    RANDAUG_CUTOUT_CONST,
    RANDAUG_OPS,
    RANDAUG_REPLACE,
    RANDAUG_TRANSLATE_CONST,
    _as_batch,
    _check_rng,
    _unbatch,
)
from flaxlab.data.augment.geometry import (
    cutout,
    rotate,
    shear_x,
    shear_y,
    translate_x,
    translate_y,
)

# --------------------------------------------------------------------------------------------
# RandAugment.


def level_to_arg(
    name: str,
    magnitude: float,
    *,
    translate_const: float = RANDAUG_TRANSLATE_CONST,
    cutout_const: float = RANDAUG_CUTOUT_CONST,
):
    """The argument the reference's ``level_to_arg`` gives op ``name`` at ``magnitude``.

    With ``l = magnitude / 10``: Rotate ``30 l`` degrees, ShearX/Y ``0.3 l``, TranslateX/Y
    ``translate_const * l`` pixels (these five are then negated with probability 1/2),
    Color/Contrast/Brightness/Sharpness ``1.8 l + 0.1``, Posterize ``int(4 l)`` bits, Solarize
    ``int(256 l)``, SolarizeAdd ``int(110 l)``, Cutout ``int(cutout_const * l)``;
    AutoContrast, Equalize and Invert take none (``None`` here).

    Args:
        name: one of :data:`RANDAUG_OPS`.
        magnitude: the RandAugment magnitude ``m`` (float; 10 is the reference's "max").
        translate_const: pixels of translation at magnitude 10 (reference: 100).
        cutout_const: Cutout half-size at magnitude 10 (reference: 40).

    Returns:
        The unsigned argument (float or int), or ``None``.
    """
    lv = float(magnitude) / MAX_LEVEL
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return lv * 30.0
    if name in ("ShearX", "ShearY"):
        return lv * 0.3
    if name in ("TranslateX", "TranslateY"):
        return lv * float(translate_const)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    if name == "Posterize":
        return int(lv * 4)
    if name == "Solarize":
        return int(lv * 256)
    if name == "SolarizeAdd":
        return int(lv * 110)
    if name == "Cutout":
        return int(lv * cutout_const)
    raise ValueError(f"RandAugment op {name!r} is unknown; accepted: {list(RANDAUG_OPS)}")


def apply_op(name, batch, arg, sign, cy, cx, replace):
    """Applies op ``name`` to a uint8 batch; ``sign``, ``cy``, ``cx`` are per image."""
    if name == "AutoContrast":
        return autocontrast(batch)
    if name == "Equalize":
        return equalize(batch)
    if name == "Invert":
        return invert(batch)
    if name == "Posterize":
        return posterize(batch, arg)
    if name == "Solarize":
        return solarize(batch, arg)
    if name == "SolarizeAdd":
        return solarize_add(batch, arg)
    if name == "Color":
        return color(batch, arg)
    if name == "Contrast":
        return contrast(batch, arg)
    if name == "Brightness":
        return brightness(batch, arg)
    if name == "Sharpness":
        return sharpness(batch, arg)
    if name == "Cutout":
        return cutout(batch, arg, (cy, cx), replace)
    geometric = {
        "Rotate": rotate,
        "ShearX": shear_x,
        "ShearY": shear_y,
        "TranslateX": translate_x,
        "TranslateY": translate_y,
    }
    return geometric[name](batch, sign * arg, replace)


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    num_layers: int,
    magnitude: float,
    *,
    translate_const: float = RANDAUG_TRANSLATE_CONST,
    cutout_const: float = RANDAUG_CUTOUT_CONST,
    replace: int = RANDAUG_REPLACE,
) -> np.ndarray:
    """RandAugment as the reference's ``distort_image_with_randaugment(image, l, m)``.

    For each of ``num_layers`` layers, one op is drawn uniformly (with replacement across
    layers) from the 16 :data:`RANDAUG_OPS` and applied with the argument
    :func:`level_to_arg` gives at ``magnitude``; Rotate, ShearX/Y and TranslateX/Y negate it
    with probability 1/2, Cutout draws its centre uniformly over the pixels. The selected op is
    always applied: the reference samples a probability ``U(0.2, 0.8)`` per op but never uses
    it in RandAugment (only AutoAugment's ``_apply_func_with_prob`` does), so no probability
    gate is drawn here. A batch ``[N, H, W, C]`` gets independent draws per image.

    The reference's constants are absolute pixel counts meant for 224x224 images (translation
    100 px and Cutout half-size 40 px at magnitude 10); on small images they blank most of
    the image, so pass e.g. ``translate_const=100 / 224 * size`` and
    ``cutout_const=40 / 224 * size`` to keep the reference's relative strength.

    Random draws, in this order: op indices ``integers(0, 16, [N, L])``, negation flags
    ``random([N, L]) < 0.5``, Cutout centres ``integers(0, H, [N, L])`` then
    ``integers(0, W, [N, L])`` (all drawn whatever ops are chosen).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``, C = 1 or 3.
        rng: the generator to draw from.
        num_layers: number of ops per image ``l >= 0``.
        magnitude: shared magnitude ``m >= 0`` (the reference's scale tops at 10 but is not
            clipped; AugReg uses 0, 10, 15, 20).
        translate_const: TranslateX/Y pixels at magnitude 10.
        cutout_const: Cutout half-size at magnitude 10.
        replace: fill value of the geometric ops and Cutout.

    Returns:
        uint8 array of the input's shape.
    """
    batch, single = _as_batch(image)
    _check_rng(rng)
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
        raise ValueError(f"num_layers={num_layers!r} must be an int >= 0")
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers} must be >= 0")
    if not np.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"magnitude={magnitude} must be a finite number >= 0")
    n, h, w, _ = batch.shape
    ops = rng.integers(0, len(RANDAUG_OPS), size=(n, num_layers))
    negate = rng.random((n, num_layers)) < 0.5
    cys = rng.integers(0, h, size=(n, num_layers))
    cxs = rng.integers(0, w, size=(n, num_layers))
    out = batch.copy()
    args = {
        name: level_to_arg(
            name, magnitude, translate_const=translate_const, cutout_const=cutout_const
        )
        for name in RANDAUG_OPS
    }
    for layer in range(num_layers):
        column = ops[:, layer]
        for k in np.unique(column):
            sel = np.flatnonzero(column == k)
            name = RANDAUG_OPS[int(k)]
            sign = np.where(negate[sel, layer], -1.0, 1.0)
            whole = len(sel) == n
            sub = out if whole else out[sel]
            res = apply_op(name, sub, args[name], sign, cys[sel, layer], cxs[sel, layer], replace)
            if whole:
                out = res
            else:
                out[sel] = res
    return _unbatch(np.ascontiguousarray(out, dtype=np.uint8), single)
