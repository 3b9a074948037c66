"""Amos (Tian & Parikh 2022): the optimizer, its per-parameter rules and their defaults."""

from flaxlab.optim.amos.defaults import (
    amos_param_table,
    amos_with_defaults,
    default_eta_fn,
    default_shape_fn,
)
from flaxlab.optim.amos.rules import (
    evaluate_shape_expression,
    load_rules_file,
    params_fn_from_assign_map,
)
from flaxlab.optim.amos.transform import AmosState, ScaleByAmosState, amos, scale_by_amos

__all__ = [
    "AmosState",
    "ScaleByAmosState",
    "amos",
    "amos_param_table",
    "amos_with_defaults",
    "default_eta_fn",
    "default_shape_fn",
    "evaluate_shape_expression",
    "load_rules_file",
    "params_fn_from_assign_map",
    "scale_by_amos",
]
