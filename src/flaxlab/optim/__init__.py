"""Optimizers (optax GradientTransformations) and their helpers."""

from flaxlab.optim.amos import (
    AmosState,
    ScaleByAmosState,
    amos,
    leaf_names,
    scale_by_amos,
    unpack_slots,
)
from flaxlab.optim.amos_defaults import (
    amos_param_table,
    amos_with_defaults,
    default_eta_fn,
    default_shape_fn,
)
from flaxlab.optim.amos_rules import evaluate_shape_expression, params_fn_from_assign_map

__all__ = [
    "AmosState",
    "ScaleByAmosState",
    "amos",
    "amos_param_table",
    "amos_with_defaults",
    "default_eta_fn",
    "default_shape_fn",
    "evaluate_shape_expression",
    "leaf_names",
    "params_fn_from_assign_map",
    "scale_by_amos",
    "unpack_slots",
]
