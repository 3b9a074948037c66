"""Experiment presets (frozen dataclass configs), one file per family, by name."""

from flaxlab.configs.registry import PRESETS, describe_presets, get_preset, register_preset

__all__ = ["PRESETS", "describe_presets", "get_preset", "register_preset"]
