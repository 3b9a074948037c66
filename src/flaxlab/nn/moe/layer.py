"""The sparse mixture-of-experts layer (V-MoE, Riquelme et al. 2021, arXiv 2106.05974).

:class:`Router` (bias-free dense router + top-k or experts-choice routing), :class:`MoeLayer`
(group tokens, route, dispatch, run the experts, combine) and :func:`routing_metrics`. The maths
lives in the pure functions of the sibling modules: ``routing`` (:func:`top_k_routing`,
:func:`experts_choice_routing`, the auxiliary losses), ``dispatch`` (three dispatchers),
``experts`` (the stacked expert MLPs), ``parallel`` (experts sharded over a mesh axis with
``jax.shard_map`` + ``all_to_all``) and ``soft`` (Soft MoE).

Parameter names and logical axes (the sharding rule table maps ``expert`` to the expert mesh axis):

=================  ===================  =============================
parameter          shape                logical axes
=================  ===================  =============================
router ``kernel``  ``(D, E)``           ``('embed', None)``
``fc1_kernel``     ``(E, D, H)``        ``('expert', 'embed', 'mlp')``
``fc1_bias``       ``(E, H)``           ``('expert', 'mlp')``
``fc2_kernel``     ``(E, H, O)``        ``('expert', 'mlp', 'embed')``
``fc2_bias``       ``(E, O)``           ``('expert', 'embed')``
=================  ===================  =============================

The axes are stored as the variables' ``out_sharding`` metadata with eager sharding off, so the
layers build without a mesh and ``nnx.get_partition_spec`` returns the logical specs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.nn.moe.dispatch import check_dispatch_kind, moe_mlp
from flaxlab.nn.moe.experts import MoeMlp, _param
from flaxlab.nn.moe.parallel import expert_parallel_moe_mlp
from flaxlab.nn.moe.routing import (
    ExpertsChoiceRouting,
    TopKRouting,
    experts_choice_routing,
    top_k_routing,
)

ROUTING_KINDS = ("top_k", "experts_choice")


class Router(nnx.Module):
    """Bias-free dense router followed by top-k or experts-choice routing.

    The routing settings are plain attributes, so they can be changed at evaluation time without
    retraining (``router.capacity_factor = 2.0``), or overridden per call.

    Args:
      in_features: token width ``D``.
      num_experts: ``E``.
      num_selected_experts: ``K`` for top-k routing.
      capacity_factor: expert capacity factor (see :func:`top_k_routing`).
      capacity_multiple_of: capacity rounding.
      batch_priority: batch-prioritised routing.
      noise_std: logit noise ``noise_std / E`` during training (``deterministic=False``).
      routing_kind: ``"top_k"`` or ``"experts_choice"``.
      param_dtype: kernel dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        num_selected_experts: int = 1,
        capacity_factor: float = 1.0,
        capacity_multiple_of: int | None = 4,
        batch_priority: bool = False,
        noise_std: float = 1.0,
        routing_kind: str = "top_k",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if routing_kind not in ROUTING_KINDS:
            raise ValueError(
                f"routing_kind={routing_kind!r} is unknown; accepted: {ROUTING_KINDS}."
            )
        self.num_experts = num_experts
        self.num_selected_experts = num_selected_experts
        self.capacity_factor = capacity_factor
        self.capacity_multiple_of = capacity_multiple_of
        self.batch_priority = batch_priority
        self.noise_std = noise_std
        self.routing_kind = routing_kind
        self.kernel = _param(
            jax.nn.initializers.lecun_normal(),
            rngs.params(),
            (in_features, num_experts),
            param_dtype,
            ("embed", None),
        )

    def routing_fn(
        self,
        *,
        num_selected_experts: int | None = None,
        capacity_factor: float | None = None,
        batch_priority: bool | None = None,
        noisy: bool = False,
    ):
        """The routing function ``(logits, noise) -> routing`` with these settings (static)."""
        noise_std = self.noise_std if noisy else 0.0
        cf = self.capacity_factor if capacity_factor is None else capacity_factor
        if self.routing_kind == "experts_choice":
            return functools.partial(
                experts_choice_routing,
                capacity_factor=cf,
                capacity_multiple_of=self.capacity_multiple_of,
                noise_std=noise_std,
            )
        return functools.partial(
            top_k_routing,
            num_selected_experts=num_selected_experts or self.num_selected_experts,
            capacity_factor=cf,
            capacity_multiple_of=self.capacity_multiple_of,
            batch_priority=self.batch_priority if batch_priority is None else batch_priority,
            noise_std=noise_std,
        )

    def noise(self, shape, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array | None:
        """Standard-normal logit noise from ``rngs.gating()`` when noisy (training), else None."""
        if deterministic or self.noise_std == 0:
            return None
        if rngs is None:
            raise ValueError(
                "The router draws noise when deterministic=False and noise_std > 0: pass "
                "rngs=nnx.Rngs(gating=...) at call time (or deterministic=True)."
            )
        return jax.random.normal(rngs.gating(), shape, jnp.float32)

    def logits(self, x: jax.Array) -> jax.Array:
        """``(G, S, D) -> (G, S, E)`` router logits."""
        return x @ self.kernel[...].astype(x.dtype)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None, **overrides):
        """Routes ``(G, S, D)`` tokens; ``overrides`` as in :meth:`routing_fn`."""
        logits = self.logits(x)
        noise = self.noise(logits.shape, deterministic=deterministic, rngs=rngs)
        route = self.routing_fn(noisy=noise is not None, **overrides)
        return route(logits, noise=noise)


def routing_metrics(
    routing: TopKRouting | ExpertsChoiceRouting,
    *,
    importance_loss_weight: float = 1.0,
    load_loss_weight: float = 1.0,
    gshard_loss_weight: float = 0.0,
    dropless: bool = False,
) -> dict[str, jax.Array]:
    """Auxiliary loss and monitoring metrics of one routing, averaged over groups.

    ``auxiliary_loss = mean_g(w_imp * importance + w_load * load + w_gshard * gshard)`` over the
    losses with weight > 0 (``load`` only when noisy); experts-choice routing has none (0).

    Returns:
      ``auxiliary_loss``, the individual losses, ``expert_load`` (``(E,)``: fraction of the
      assignments that chose each expert, before capacity; for experts choice, of the slots),
      ``dropped_fraction`` (top-k: assignments past capacity, 0 when dropless; experts choice:
      tokens no expert took) and ``router_entropy`` (mean entropy of the gates, nats).
    """
    entropy = jnp.mean(jnp.sum(jax.scipy.special.entr(routing.gates), axis=-1))
    num_experts = routing.num_experts
    if isinstance(routing, ExpertsChoiceRouting):
        taken = jnp.zeros(routing.gates.shape[:2], jnp.bool_)
        taken = jax.vmap(lambda t, i: t.at[i.reshape(-1)].set(True))(taken, routing.token_index)
        return {
            "auxiliary_loss": jnp.zeros((), jnp.float32),
            "expert_load": jnp.full((num_experts,), 1.0 / num_experts, jnp.float32),
            "dropped_fraction": jnp.mean((~taken).astype(jnp.float32)),
            "router_entropy": entropy,
        }
    losses = {"importance_loss": routing.importance_loss, "gshard_loss": routing.gshard_loss}
    weights = {"importance_loss": importance_loss_weight, "gshard_loss": gshard_loss_weight}
    if routing.load_loss is not None:
        losses["load_loss"] = routing.load_loss
        weights["load_loss"] = load_loss_weight
    total = sum(
        (weights[name] * loss for name, loss in losses.items() if weights[name] > 0),
        jnp.zeros_like(routing.importance_loss),
    )
    load = jnp.mean(jax.nn.one_hot(routing.expert_index, num_experts), axis=(0, 1, 2))
    dropped = 0.0 if dropless else jnp.mean((~routing.valid).astype(jnp.float32))
    metrics = {name: jnp.mean(loss) for name, loss in losses.items()}
    metrics.update(
        auxiliary_loss=jnp.mean(total),
        expert_load=load,
        dropped_fraction=jnp.asarray(dropped, jnp.float32),
        router_entropy=entropy,
    )
    return metrics


class MoeLayer(nnx.Module):
    """Sparse MoE MLP block: group tokens, route, dispatch, run experts, combine.

    ``(B, T, D) -> (B, T, O)``: the ``B * T`` tokens are split into groups of ``group_size``
    (default: one group per sequence), each routed independently; a token whose assignments are
    all dropped outputs zeros (the residual connection around the block carries it).

    Args:
      in_features: ``D``.
      mlp_dim: expert hidden width ``H``.
      num_experts: ``E``.
      out_features: ``O`` (default ``D``).
      group_size: tokens per routing group (``B * T`` must be a multiple).
      num_selected_experts, capacity_factor, capacity_multiple_of, batch_priority, noise_std,
        routing_kind: router settings (see :class:`Router`).
      dispatch_kind: ``"einsum"`` (reference), ``"indices"`` or ``"ragged"`` (dropless).
      dropout_rate: dropout inside the experts while training (after the GELU and after the
        output layer, as the reference's expert ``MlpBlock``); draws from ``rngs.dropout``.
      importance_loss_weight, load_loss_weight, gshard_loss_weight: auxiliary loss weights
        (the reference's defaults: 1, 1, 0).
      mesh: a mesh to run the experts sharded over ``expert_axis`` (``jax.shard_map`` +
        ``all_to_all``); ``None`` runs on one device / under plain ``jit`` sharding.
      expert_axis: the mesh axis name of expert parallelism.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> layer = MoeLayer(8, 16, 4, num_selected_experts=2, group_size=4, rngs=nnx.Rngs(0))
      >>> y, aux = layer(jnp.ones((2, 4, 8)))
      >>> y.shape, sorted(aux)[:2]
      ((2, 4, 8), ['auxiliary_loss', 'dropped_fraction'])
    """

    def __init__(
        self,
        in_features: int,
        mlp_dim: int,
        num_experts: int,
        *,
        out_features: int | None = None,
        group_size: int | None = None,
        num_selected_experts: int = 1,
        capacity_factor: float = 1.0,
        capacity_multiple_of: int | None = 4,
        batch_priority: bool = False,
        noise_std: float = 1.0,
        routing_kind: str = "top_k",
        dispatch_kind: str = "indices",
        dropout_rate: float = 0.0,
        importance_loss_weight: float = 1.0,
        load_loss_weight: float = 1.0,
        gshard_loss_weight: float = 0.0,
        share_expert_init: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        expert_axis: str = "expert",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dispatch_kind(dispatch_kind, routing_kind)
        if mesh is not None and expert_axis not in mesh.axis_names:
            raise ValueError(
                f"expert_axis={expert_axis!r} is not an axis of the mesh {mesh.axis_names}."
            )
        self.group_size = group_size
        self.dispatch_kind = dispatch_kind
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1).")
        self.dropout_rate = dropout_rate
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        self.gshard_loss_weight = gshard_loss_weight
        self.mesh = mesh
        self.expert_axis = expert_axis
        self.router = Router(
            in_features,
            num_experts,
            num_selected_experts=num_selected_experts,
            capacity_factor=capacity_factor,
            capacity_multiple_of=capacity_multiple_of,
            batch_priority=batch_priority,
            noise_std=noise_std,
            routing_kind=routing_kind,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.experts = MoeMlp(
            num_experts,
            in_features,
            mlp_dim,
            out_features=out_features,
            share_init=share_expert_init,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        num_selected_experts: int | None = None,
        capacity_factor: float | None = None,
        batch_priority: bool | None = None,
        dispatch_kind: str | None = None,
        group_size: int | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the block; the keyword overrides change routing for this call only.

        Args:
          x: ``(B, T, D)`` tokens.
          deterministic: no router noise and no dropout when True (evaluation).
          rngs: ``nnx.Rngs`` with a ``gating`` stream (or ``default``) when noise is drawn, and a
            ``dropout`` stream when ``dropout_rate > 0`` while training.
          num_selected_experts, capacity_factor, batch_priority, dispatch_kind, group_size:
            overrides of the layer's settings for this call.

        Returns:
          ``(y, aux)``: ``y`` of shape ``(B, T, O)`` and the :func:`routing_metrics` dict.
        """
        if x.ndim != 3:
            raise ValueError(f"MoeLayer takes (batch, tokens, hidden) inputs; got {x.shape}.")
        kind = self.dispatch_kind if dispatch_kind is None else dispatch_kind
        check_dispatch_kind(kind, self.router.routing_kind)
        batch, tokens, dim = x.shape
        group_size = group_size or self.group_size or tokens
        if (batch * tokens) % group_size:
            raise ValueError(
                f"batch * tokens = {batch * tokens} is not a multiple of group_size={group_size}."
            )
        if self.mesh is not None and _is_explicit(self.mesh):
            groups_spec = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec(self.expert_axis)
            )
            groups = jax.lax.reshape(
                x, (batch * tokens // group_size, group_size, dim), out_sharding=groups_spec
            )
        else:
            groups = x.reshape(-1, group_size, dim)
        noise_shape = (*groups.shape[:2], self.router.num_experts)
        noise = self.router.noise(noise_shape, deterministic=deterministic, rngs=rngs)
        route = self.router.routing_fn(
            num_selected_experts=num_selected_experts,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
            noisy=noise is not None,
        )
        metrics_fn = functools.partial(
            routing_metrics,
            importance_loss_weight=self.importance_loss_weight,
            load_loss_weight=self.load_loss_weight,
            gshard_loss_weight=self.gshard_loss_weight,
            dropless=kind == "ragged",
        )
        params = self.experts.param_dict()
        router_kernel = self.router.kernel[...].astype(x.dtype)
        dropout_key = None
        if not deterministic and self.dropout_rate > 0.0:
            if rngs is None:
                raise ValueError(
                    f"MoeLayer dropout_rate={self.dropout_rate} while training needs "
                    "rngs=nnx.Rngs(dropout=...) (or deterministic=True)."
                )
            dropout_key = rngs.dropout()
        drop: dict[str, Any] = dict(dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        if self.mesh is None:
            routing = route(groups @ router_kernel, noise=noise)
            y = moe_mlp(params, groups, routing, kind, **drop)
            aux = metrics_fn(routing)
        else:
            y, aux = expert_parallel_moe_mlp(
                params,
                router_kernel,
                groups,
                noise,
                route=route,
                metrics_fn=metrics_fn,
                kind=kind,
                mesh=self.mesh,
                axis_name=self.expert_axis,
                **drop,
            )
            if _is_explicit(self.mesh):
                # Explicit-sharding reshapes need the output layout: keep the input's.
                out_sharding = jax.sharding.NamedSharding(self.mesh, jax.typeof(x).sharding.spec)
                y = jax.lax.reshape(y, (batch, tokens, y.shape[-1]), out_sharding=out_sharding)
        return y.reshape(batch, tokens, -1), aux


def _is_explicit(mesh: jax.sharding.Mesh) -> bool:
    return all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
