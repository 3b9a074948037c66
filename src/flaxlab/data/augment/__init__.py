"""AugReg augmentation in NumPy and PIL: Inception crop, RandAugment, Mixup, the named settings.

This reimplements, without TensorFlow, the training-time input pipeline of the AugReg paper
("How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers",
Steiner et al. 2021) as released in google-research/big_vision:

* ``decode_jpeg_and_inception_crop(224)|flip_lr|randaug(l, m)`` for training
  (``big_vision/configs/vit_i1k.py``), :func:`augment_batch` here;
* ``resize_small(256)|central_crop(224)`` for evaluation, :func:`resize_center_crop`;
* Mixup as ``big_vision/utils.py::get_mixup``, :func:`mixup`;
* the seven named settings ``none, light1, light2, medium1, medium2, strong1, strong2``,
  :data:`AUGREG_SETTINGS`.

Conventions follow :mod:`flaxlab.data.pipeline`: images are uint8 ``[H, W, C]`` or
``[N, H, W, C]`` in [0, 255] with ``C`` = 1 (greyscale) or 3 (RGB); every random choice is drawn
from a caller-supplied ``numpy.random.Generator``, so results are a pure function of the
generator's state (a batch is a pure function of ``(seed, step)`` when the caller seeds the
generator with them).

The RandAugment operations reproduce ``big_vision/pp/autoaugment.py`` (a fork of
tensorflow/tpu ``efficientnet/autoaugment.py``, run with TensorFlow and tensorflow_addons)
value for value, including its float32 arithmetic (up to the summation order of TensorFlow's
kernels: Sharpness and Color can rarely truncate one grey level apart), truncating uint8
casts, nearest-neighbour geometry with grey (128) fill and three well-known quirks of that
code that the released AugReg models were trained with (each is documented at its op):
``contrast`` blends towards ``H * W / 256`` instead of the mean grey level (big_vision issue
#109), ``solarize`` compares against its threshold cast to uint8, so a threshold of 256 wraps
to 0 (issue #110), and ``posterize`` shifts by at most 7 bits (TensorFlow clamps shift
counts). Greyscale images are treated exactly as the RGB image with three equal channels
would be, then reduced back to one channel. Crop boxes follow the rule of
``tf.image.sample_distorted_bounding_box`` exactly; crops are resized with PIL (see
:func:`inception_crop` for how that differs from ``tf.image.resize``). The random choices
come from NumPy, not TensorFlow's generators: outputs match the reference in distribution,
and value for value given the same choices.
"""

from flaxlab.data.augment.batch import (
    AUGREG_REGULARIZATION,
    AUGREG_SETTINGS,
    AugRegSetting,
    augment_batch,
    augreg_setting,
    mixup,
)
from flaxlab.data.augment.color import (
    autocontrast,
    blend,
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
    INCEPTION_AREA_RANGE,
    INCEPTION_ASPECT_RANGE,
    INCEPTION_MAX_ATTEMPTS,
    MAX_LEVEL,
    NEGATED_OPS,
    RANDAUG_CUTOUT_CONST,
    RANDAUG_OPS,
    RANDAUG_REPLACE,
    RANDAUG_TRANSLATE_CONST,
)
from flaxlab.data.augment.crops import (
    inception_crop,
    inception_crop_batch,
    resize_center_crop,
    sample_crop_box,
    sample_crop_boxes,
)
from flaxlab.data.augment.geometry import (
    cutout,
    rotate,
    shear_x,
    shear_y,
    translate_x,
    translate_y,
)
from flaxlab.data.augment.randaug import (
    apply_op,
    level_to_arg,
    rand_augment,
)

__all__ = [
    "apply_op",
    "AUGREG_REGULARIZATION",
    "AUGREG_SETTINGS",
    "AugRegSetting",
    "INCEPTION_AREA_RANGE",
    "INCEPTION_ASPECT_RANGE",
    "INCEPTION_MAX_ATTEMPTS",
    "MAX_LEVEL",
    "NEGATED_OPS",
    "RANDAUG_CUTOUT_CONST",
    "RANDAUG_OPS",
    "RANDAUG_REPLACE",
    "RANDAUG_TRANSLATE_CONST",
    "augment_batch",
    "augreg_setting",
    "autocontrast",
    "blend",
    "brightness",
    "color",
    "contrast",
    "cutout",
    "equalize",
    "inception_crop",
    "inception_crop_batch",
    "invert",
    "level_to_arg",
    "mixup",
    "posterize",
    "rand_augment",
    "resize_center_crop",
    "rotate",
    "sample_crop_box",
    "sample_crop_boxes",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "solarize_add",
    "translate_x",
    "translate_y",
]
