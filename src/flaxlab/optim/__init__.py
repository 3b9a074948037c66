"""Optimizers (optax GradientTransformations), their settings and the factory."""

from flaxlab.optim.amos import (
    AmosState,
    ScaleByAmosState,
    amos,
    amos_param_table,
    amos_with_defaults,
    default_eta_fn,
    default_shape_fn,
    evaluate_shape_expression,
    load_rules_file,
    params_fn_from_assign_map,
    scale_by_amos,
)
from flaxlab.optim.factory import (
    OPTIMIZERS,
    AdamWConfig,
    AmosConfig,
    OptimizerConfig,
    SGDConfig,
    make_optimizer,
    make_schedule,
)
from flaxlab.optim.sharpness import (
    SHARPNESS_KINDS,
    SharpnessGradient,
    gsam_gradient,
    gsam_rho,
    sam_gradient,
    sharpness_gradient,
)

__all__ = [
    "OPTIMIZERS",
    "SHARPNESS_KINDS",
    "SharpnessGradient",
    "AdamWConfig",
    "AmosConfig",
    "AmosState",
    "OptimizerConfig",
    "SGDConfig",
    "ScaleByAmosState",
    "amos",
    "amos_param_table",
    "amos_with_defaults",
    "default_eta_fn",
    "default_shape_fn",
    "gsam_gradient",
    "gsam_rho",
    "evaluate_shape_expression",
    "load_rules_file",
    "make_optimizer",
    "make_schedule",
    "params_fn_from_assign_map",
    "sam_gradient",
    "scale_by_amos",
    "sharpness_gradient",
]
