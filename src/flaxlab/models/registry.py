"""Model families by name: the only list of them.

A family is a module (or package) that exposes ``Config`` (its model's config dataclass),
``Model`` (the NNX module, built as ``Model(config, rngs=rngs)``) and ``Task`` (a
:class:`~flaxlab.train.task.Task` class whose settings dataclass is ``Task.Config``), and
``load_pretrained`` where weights are released. The estimator, ``config.json`` and the CLI find
everything about a family through :func:`family`; adding one is a module plus its presets and
one line here (or a :func:`register_family` call from the user's code).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

# family name -> module path; imported lazily, so a family's dependencies load when it is used.
_FAMILIES: dict[str, str | Any] = {
    "vit": "flaxlab.models.vit",
    "mixer": "flaxlab.models.mixer",
    "vmoe": "flaxlab.models.vmoe",
    "vdm": "flaxlab.models.vdm",
    "performer_lm": "flaxlab.models.performer_lm",
    "lit": "flaxlab.models.lit",
}
REQUIRED = ("Config", "Model", "Task")


def register_family(name: str, family: str | ModuleType | Any) -> None:
    """Registers a family under ``name``: a module path, a module, or any object with
    ``Config``, ``Model`` and ``Task`` attributes (checked now for an object)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a family name must be a non-empty string, got {name!r}")
    if not isinstance(family, str):
        _check(name, family)
    _FAMILIES[name] = family


def family_names() -> list[str]:
    """Every registered family name, sorted."""
    return sorted(_FAMILIES)


def family(name: str) -> Any:
    """The family ``name``: its module (or registered object) with ``Config``, ``Model``,
    ``Task``."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; accepted: {family_names()}")
    entry = _FAMILIES[name]
    if isinstance(entry, str):
        entry = importlib.import_module(entry)
        _check(name, entry)
    return entry


def _check(name: str, entry) -> None:
    missing = [attr for attr in REQUIRED if not hasattr(entry, attr)]
    if missing:
        raise ValueError(f"model family {name!r} ({entry!r}) lacks {', '.join(missing)}")


def model_config_class(name: str) -> type:
    """The model config dataclass of family ``name``."""
    return family(name).Config


def model_class(name: str) -> type:
    """The NNX module class of family ``name``."""
    return family(name).Model


def task_class(name: str) -> type:
    """The task class of family ``name``."""
    return family(name).Task
