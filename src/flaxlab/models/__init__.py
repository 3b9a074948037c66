"""Model families: a config dataclass with named variants and an NNX module per file."""

from flaxlab.models.mixer import Mixer, MixerConfig
from flaxlab.models.vit import ViT, ViTConfig, count_parameters

__all__ = ["Mixer", "MixerConfig", "ViT", "ViTConfig", "count_parameters"]
