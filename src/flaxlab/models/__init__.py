"""Model families: each a module or package with ``Config``, ``Model`` and ``Task``.

``flaxlab.models.registry`` maps family names to them; the model classes and their configs are
exported here.
"""

from flaxlab.models import registry
from flaxlab.models.classification import ClassificationConfig, ClassificationTask
from flaxlab.models.mixer import Mixer, MixerConfig
from flaxlab.models.performer_lm import LMTask, LMTaskConfig, PerformerLM, PerformerLMConfig
from flaxlab.models.pretrained import load_pretrained, resize_posemb
from flaxlab.models.registry import family, family_names, register_family
from flaxlab.models.vdm import VDM, VDMConfig, VDMTask, VDMTaskConfig
from flaxlab.models.vit import ViT, ViTConfig, count_parameters
from flaxlab.models.vmoe import MoeConfig, VMoE, VMoEConfig, upcycle

__all__ = [
    "VDM",
    "ClassificationConfig",
    "ClassificationTask",
    "LMTask",
    "LMTaskConfig",
    "Mixer",
    "MixerConfig",
    "MoeConfig",
    "PerformerLM",
    "PerformerLMConfig",
    "VDMConfig",
    "VDMTask",
    "VDMTaskConfig",
    "VMoE",
    "VMoEConfig",
    "ViT",
    "ViTConfig",
    "count_parameters",
    "family",
    "family_names",
    "load_pretrained",
    "register_family",
    "registry",
    "resize_posemb",
    "upcycle",
]
