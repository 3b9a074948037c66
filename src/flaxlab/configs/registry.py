"""Experiment presets by name: the only list of them.

Each preset is a function returning an :class:`~flaxlab.train.config.ExperimentConfig`; its
docstring gives the command, the expected metric and the time on 2 CPU cores (as big_vision's
configs do). ``flaxlab presets`` lists them; :func:`register_preset` adds one from user code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from flaxlab.configs.lit import lit_digits
from flaxlab.configs.text import performer_lm_stdlib
from flaxlab.configs.vdm import vdm_cifar10, vdm_digits
from flaxlab.configs.vision import mixer_digits, vit_digits, vit_finetune, vmoe_digits
from flaxlab.train.config import ExperimentConfig, apply_overrides

PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "vit-digits": vit_digits,
    "vit-finetune": vit_finetune,
    "mixer-digits": mixer_digits,
    "vmoe-digits": vmoe_digits,
    "vdm-digits": vdm_digits,
    "vdm-cifar10": vdm_cifar10,
    "performer-lm-stdlib": performer_lm_stdlib,
    "lit-digits": lit_digits,
}


def register_preset(name: str, factory: Callable[[], ExperimentConfig]) -> None:
    """Makes ``get_preset(name)`` (and ``flaxlab train name``) build ``factory()``."""
    PRESETS[name] = factory


def get_preset(name: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """The preset ``name`` with ``--set`` style overrides applied."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ValueError(f"unknown preset {name!r}; {hint}available: {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name](), overrides or [])


def describe_presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    out = {}
    for name, factory in sorted(PRESETS.items()):
        doc = (factory.__doc__ or "").strip().splitlines()
        out[name] = doc[0] if doc else factory().description
    return out
