"""The data settings of an experiment: where the data come from, batching and augmentation."""

from __future__ import annotations

import dataclasses
from typing import Any

SOURCE_KINDS = ("digits", "folder", "npz", "cifar")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data come from, how they are batched and augmented.

    Attributes:
      name: ``digits`` (bundled), ``npz``, ``image_folder``, ``cifar``, ``stdlib_text`` (the
        Python standard library's sources as bytes, for language models) or a registered
        source (``digits_captions`` for LiT).
      path: training data for ``npz``/``image_folder``/``cifar`` (``stdlib_text``: another
        folder of the standard library's layout).
      eval_path: evaluation data (defaults: digits' test split, CIFAR's test batch, an image
        folder's ``test``/``val`` sub-folder or its held-out ``eval_fraction``).
      source: a shorthand for ``name`` and ``path``: ``digits``, ``folder:DIR``, ``npz:FILE``
        or ``cifar:DIR``.
      batch_size: global training batch size (divisible by the number of devices).
      eval_batch_size: evaluation batch size.
      image_size: resize folder images to ``(H, W)`` (training: bilinear, or the Inception
        crop's size; evaluation: resize the shorter side, then crop the centre).
      channels: 1 (greyscale) or 3 (RGB) for folder images (default: the model's).
      eval_fraction: held out, stratified and fixed (seed 0), of a folder with no test split.
      class_names: the classes' names (set from the training data when training starts).
      crop_padding: random-crop augmentation: pad by this many pixels, crop back.
      flip: random left-right flips.
      inception_crop: Inception-style random crop (area 5-100%, aspect 3/4-4/3) resized back.
      randaug_layers, randaug_magnitude: RandAugment ``(l, m)`` (0 layers: off); translate and
        cutout sizes scale with the image (the reference's 100 and 40 pixels are for 224).
      mixup_alpha: Mixup with ``Beta(alpha, alpha)`` (0: off); the labels mix too.
      augreg: one of the AugReg paper's settings (``none``, ``light1``, ``light2``,
        ``medium1``, ``medium2``, ``strong1``, ``strong2``): Inception crop, flip,
        RandAugment and Mixup as the reference (it overrides those four fields; dropout and
        stochastic depth stay the model's, 0.0 or 0.1 in the paper). ``none`` is the
        paper's setting (Inception crop and flip only); ``--set data.augreg=null`` unsets it.
      seed: data order and augmentation seed.
      seq_len: sequence length for text tasks.
    """

    name: str = "digits"
    path: str | None = None
    eval_path: str | None = None
    source: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 256
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    eval_fraction: float = 0.1
    class_names: tuple[str, ...] | None = None
    crop_padding: int = 0
    flip: bool = False
    inception_crop: bool = False
    randaug_layers: int = 0
    randaug_magnitude: int = 10
    mixup_alpha: float = 0.0
    augreg: str | None = None
    seed: int = 0
    seq_len: int = 128

    def __post_init__(self):
        from flaxlab.data.augment import augreg_setting

        size: Any = self.image_size
        if size is not None and not isinstance(size, tuple):
            pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
            object.__setattr__(self, "image_size", pair)
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.source is not None:
            kind, _, location = self.source.partition(":")
            if kind not in SOURCE_KINDS or (kind != "digits" and not location):
                raise ValueError(
                    f"data.source={self.source!r}; accepted: 'digits', 'folder:DIR', "
                    "'npz:FILE', 'cifar:DIR'"
                )
            name = {"folder": "image_folder"}.get(kind, kind)
            object.__setattr__(self, "name", name)
            object.__setattr__(self, "path", location or None)
        if self.augreg is not None:
            setting = augreg_setting(self.augreg)
            object.__setattr__(self, "inception_crop", True)
            object.__setattr__(self, "flip", True)
            object.__setattr__(self, "randaug_layers", setting.randaug_layers or 0)
            object.__setattr__(self, "randaug_magnitude", int(setting.randaug_magnitude or 0))
            object.__setattr__(self, "mixup_alpha", setting.mixup_alpha)
        for field in ("batch_size", "eval_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"data.{field}={getattr(self, field)} must be >= 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"data.channels={self.channels}; accepted: 1, 3")
        if self.randaug_layers < 0 or not 0 <= self.randaug_magnitude <= 30:
            raise ValueError(
                f"data.randaug_layers={self.randaug_layers}, randaug_magnitude="
                f"{self.randaug_magnitude}: layers >= 0, magnitude in [0, 30]"
            )
        if self.mixup_alpha < 0:
            raise ValueError(f"data.mixup_alpha={self.mixup_alpha} must be >= 0")
