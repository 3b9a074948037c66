"""Model families: a config dataclass with named variants and an NNX module per file."""

from flaxlab.models.mixer import Mixer, MixerConfig
from flaxlab.models.vit import ViT, ViTConfig, count_parameters
from flaxlab.models.vit_checkpoints import load_pretrained, resize_posemb

__all__ = [
    "Mixer",
    "MixerConfig",
    "ViT",
    "ViTConfig",
    "count_parameters",
    "load_pretrained",
    "resize_posemb",
]
