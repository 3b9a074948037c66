"""Sparse and soft mixtures of experts (V-MoE, Riquelme et al. 2021; Soft MoE, Puigcerver 2023)."""

from flaxlab.nn.moe.dispatch import (
    DISPATCH_KINDS,
    buffered_moe_mlp,
    check_dispatch_kind,
    combine,
    dispatch,
    dropless_moe_mlp,
    moe_mlp,
)
from flaxlab.nn.moe.experts import MoeMlp, expert_mlp
from flaxlab.nn.moe.layer import ROUTING_KINDS, MoeLayer, Router, routing_metrics
from flaxlab.nn.moe.parallel import expert_parallel_moe_mlp
from flaxlab.nn.moe.routing import (
    ExpertsChoiceRouting,
    TopKRouting,
    compute_capacity,
    experts_choice_routing,
    gshard_loss,
    importance_loss,
    load_loss,
    top_k_routing,
)
from flaxlab.nn.moe.soft import SoftMoeLayer, soft_moe, soft_moe_weights

__all__ = [
    "DISPATCH_KINDS",
    "ROUTING_KINDS",
    "ExpertsChoiceRouting",
    "MoeLayer",
    "MoeMlp",
    "Router",
    "SoftMoeLayer",
    "TopKRouting",
    "buffered_moe_mlp",
    "check_dispatch_kind",
    "combine",
    "compute_capacity",
    "dispatch",
    "dropless_moe_mlp",
    "expert_mlp",
    "expert_parallel_moe_mlp",
    "experts_choice_routing",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "moe_mlp",
    "routing_metrics",
    "soft_moe",
    "soft_moe_weights",
    "top_k_routing",
]
