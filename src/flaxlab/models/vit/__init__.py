"""Vision Transformer (Dosovitskiy et al. 2020): the model, its config and released weights.

The family of the model registry: ``Config`` (:class:`ViTConfig`), ``Model`` (:class:`ViT`),
``Task`` (image classification) and ``load_pretrained`` (the official ``.npz`` checkpoints).
"""

from flaxlab.models.classification import ClassificationTask as Task
from flaxlab.models.pretrained import load_pretrained, resize_posemb
from flaxlab.models.vit.checkpoints import vit_params_from_npz
from flaxlab.models.vit.model import (
    VIT_PATCHES,
    VIT_SIZES,
    ViT,
    ViTConfig,
    config_from_checkpoint,
    count_parameters,
    posemb_sincos2d,
)
from flaxlab.models.vit.model import ViT as Model
from flaxlab.models.vit.model import ViTConfig as Config

__all__ = [
    "VIT_PATCHES",
    "VIT_SIZES",
    "Config",
    "Model",
    "Task",
    "ViT",
    "ViTConfig",
    "config_from_checkpoint",
    "count_parameters",
    "load_pretrained",
    "posemb_sincos2d",
    "resize_posemb",
    "vit_params_from_npz",
]
