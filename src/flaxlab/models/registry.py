"""Model families by name: their config dataclass and their NNX module.

A family registers itself here so that ``config.json`` can be read back and the estimator can
build the model without knowing the family.
"""

from __future__ import annotations

import importlib

# family name -> "module:ConfigClass:ModuleClass"; imported lazily so that a family's heavy
# dependencies load only when it is used.
_FAMILIES: dict[str, str] = {
    "vit": "flaxlab.models.vit:ViTConfig:ViT",
    "mixer": "flaxlab.models.mixer:MixerConfig:Mixer",
    "vmoe": "flaxlab.models.vmoe:VMoEConfig:VMoE",
    "vdm": "flaxlab.models.vdm:VDMConfig:VDM",
    "performer_lm": "flaxlab.models.performer_lm:PerformerLMConfig:PerformerLM",
}


def register_model_family(name: str, spec: str) -> None:
    """Registers ``"package.module:ConfigClass:ModuleClass"`` under ``name``."""
    _FAMILIES[name] = spec


def model_families() -> list[str]:
    return sorted(_FAMILIES)


def _load(name: str):
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; accepted: {model_families()}")
    module, config_cls, model_cls = _FAMILIES[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, config_cls), getattr(mod, model_cls)


def model_config_class(name: str):
    return _load(name)[0]


def model_class(name: str):
    return _load(name)[1]
