"""V-MoE: a Vision Transformer whose MLP blocks are sparse mixtures of experts at chosen layers.

Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts",
https://arxiv.org/abs/2106.05974 (reference google-research/vmoe ``nn/vit_moe.py`` and
``configs/vmoe_paper``). The ViT of :mod:`flaxlab.models.vit` with the MLP of the blocks in
``moe.layers`` replaced by :class:`~flaxlab.nn.moe.MoeLayer` (noisy top-k router, experts
``Dense -> tanh-GELU -> Dense``). The model returns ``(logits, aux)`` where ``aux["aux_loss"]`` is
the sum of the MoE layers' weighted auxiliary losses (the estimator adds it to the training loss)
and the other entries are per-layer routing metrics.

Reference layouts (:meth:`VMoEConfig.variant`): V-MoE sizes differ from ViT's at "S" (hidden 512,
8 layers, MLP 2048, 8 heads); ``"every<n>"`` puts MoE layers at ``n-1, 2n-1, ...`` and
``"last<n>"`` at the last ``n`` odd-numbered blocks; groups of 8 images' tokens; capacity factor
1.05 for training; importance and load loss weights 0.005; noise 1/E; all experts start from the
same weights; representation layer of the hidden size; head bias ``-log(num_classes)``.

Routing can be changed at evaluation time without retraining: pass ``num_selected_experts``,
``capacity_factor`` or ``batch_priority`` to the call, set ``moe.eval_capacity_factor``, or call
:meth:`VMoE.set_routing`. :func:`upcycle` initialises a V-MoE from a trained dense ViT (every
expert a copy of the dense MLP).

Example:
  >>> from flax import nnx
  >>> config = VMoEConfig.variant("S/32", num_classes=10, image_size=64, moe_layers="last2")
  >>> model = VMoE(config, rngs=nnx.Rngs(0))
  >>> logits, aux = model(jnp.zeros((8, 64, 64, 3)))
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flaxlab.models.classification import ClassificationTask
from flaxlab.models.common import parse_variant, resolve_dtype
from flaxlab.models.vit.model import ViT, ViTConfig
from flaxlab.nn.layers_scan import run_blocks
from flaxlab.nn.moe import DISPATCH_KINDS, ROUTING_KINDS, MoeLayer
from flaxlab.nn.transformer import LAYERNORM_EPSILON, EncoderBlock, drop_path

# name: (hidden_size, num_layers, num_heads, mlp_dim), as the reference's vmoe_paper configs.
VMOE_SIZES = {
    "S": (512, 8, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def moe_layer_indices(where: str, num_layers: int) -> tuple[int, ...]:
    """Block indices of the MoE layers: ``"every<n>"`` or ``"last<n>"`` (the reference's rule).

    Example:
      >>> moe_layer_indices("every2", 12), moe_layer_indices("last2", 8)
      ((1, 3, 5, 7, 9, 11), (5, 7))
    """
    match = re.fullmatch(r"(every|last)(\d+)", where.lower())
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"moe_layers={where!r} must be 'every<n>' or 'last<n>' with n >= 1.")
    n = int(match.group(2))
    if match.group(1) == "every":
        return tuple(range(n - 1, num_layers, n))
    return tuple(range(1, num_layers, 2))[-n:]


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts settings of a :class:`VMoE` (defaults: the V-MoE paper's training).

    Attributes:
      layers: encoder block indices whose MLP is a MoE layer.
      num_experts: experts per MoE layer.
      num_selected_experts: ``k`` of top-k routing.
      group_images: images whose tokens form one routing group (the reference: 8); a batch not
        divisible by it uses ``gcd(batch, group_images)``.
      capacity_factor: expert capacity factor during training.
      eval_capacity_factor: capacity factor when ``deterministic`` (None: the same).
      capacity_multiple_of: capacity rounding.
      batch_priority: batch-prioritised routing.
      noise_std: router noise (standard deviation ``noise_std / num_experts``) while training.
      importance_loss_weight, load_loss_weight, gshard_loss_weight: auxiliary loss weights.
      dispatch_kind: ``"einsum"`` (reference), ``"indices"`` or ``"ragged"`` (dropless).
      routing_kind: ``"top_k"`` or ``"experts_choice"``.
      share_expert_init: all experts of a layer start from the same weights (the reference).
      dropout_rate: dropout inside the experts while training (None: the model's
        ``dropout_rate``, as the reference's expert MLPs).
    """

    layers: tuple[int, ...] = ()
    num_experts: int = 8
    num_selected_experts: int = 2
    group_images: int = 8
    capacity_factor: float = 1.05
    eval_capacity_factor: float | None = None
    capacity_multiple_of: int = 4
    batch_priority: bool = False
    noise_std: float = 1.0
    importance_loss_weight: float = 0.005
    load_loss_weight: float = 0.005
    gshard_loss_weight: float = 0.0
    dispatch_kind: str = "indices"
    routing_kind: str = "top_k"
    share_expert_init: bool = True
    dropout_rate: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.dropout_rate is not None and not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"moe.dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.dispatch_kind not in DISPATCH_KINDS:
            raise ValueError(
                f"moe.dispatch_kind={self.dispatch_kind!r} is unknown; accepted: {DISPATCH_KINDS}"
            )
        if self.routing_kind not in ROUTING_KINDS:
            raise ValueError(
                f"moe.routing_kind={self.routing_kind!r} is unknown; accepted: {ROUTING_KINDS}"
            )
        if not 1 <= self.num_selected_experts <= self.num_experts:
            raise ValueError(
                f"moe.num_selected_experts={self.num_selected_experts} must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.group_images < 1:
            raise ValueError(f"moe.group_images={self.group_images} must be >= 1")


@dataclasses.dataclass(frozen=True)
class VMoEConfig(ViTConfig):
    """A :class:`~flaxlab.models.vit.ViTConfig` plus ``moe`` and the head bias initialiser."""

    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
    head_bias_init: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoeConfig(**self.moe))
        bad = [i for i in self.moe.layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"moe.layers {bad} are not encoder blocks; accepted: 0..{self.num_layers - 1}"
            )

    @classmethod
    def variant(
        cls,
        name: str,
        *,
        moe_layers: str = "last2",
        num_experts: int = 8,
        num_selected_experts: int = 2,
        num_classes: int = 1000,
        **overrides,
    ) -> VMoEConfig:
        """A reference layout, e.g. ``variant("B/16", moe_layers="every2", num_experts=32)``.

        Sizes S/B/L/H as the V-MoE paper (S is hidden 512, 8 layers), representation layer of
        the hidden size, head bias ``-log(num_classes)``, MoE at ``moe_layers``.
        """
        dims, patch = parse_variant(name, VMOE_SIZES, (16, 32), "V-MoE", any_patch=True)
        hidden, layers, heads, mlp = dims
        moe = MoeConfig(
            layers=moe_layer_indices(moe_layers, layers),
            num_experts=num_experts,
            num_selected_experts=num_selected_experts,
        )
        fields: dict[str, Any] = dict(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            mlp_dim=mlp,
            patch_size=(patch, patch),
            representation_size=hidden,
            num_classes=num_classes,
            head_bias_init=-math.log(num_classes),
            moe=moe,
        )
        fields.update(overrides)
        return cls(**fields)


class MoeEncoderBlock(EncoderBlock):
    """Pre-LN encoder block whose MLP is a :class:`~flaxlab.nn.moe.MoeLayer`.

    ``block(x, ...) -> (x', aux)``; the MoE output is combined like the dense MLP's (residual,
    drop-path); dropped tokens pass through the residual unchanged.
    """

    def __init__(self, hidden_size, num_heads, mlp_dim, moe: MoeConfig, **kwargs):
        self.moe_config = moe
        super().__init__(hidden_size, num_heads, mlp_dim, **kwargs)

    def make_mlp(self, hidden_size, mlp_dim, dropout_rate, dtype, rngs) -> nnx.Module:
        m = self.moe_config
        rate = dropout_rate if m.dropout_rate is None else m.dropout_rate
        return MoeLayer(
            hidden_size,
            mlp_dim,
            m.num_experts,
            num_selected_experts=m.num_selected_experts,
            capacity_factor=m.capacity_factor,
            capacity_multiple_of=m.capacity_multiple_of,
            batch_priority=m.batch_priority,
            noise_std=m.noise_std,
            routing_kind=m.routing_kind,
            dispatch_kind=m.dispatch_kind,
            dropout_rate=rate,
            importance_loss_weight=m.importance_loss_weight,
            load_loss_weight=m.load_loss_weight,
            gshard_loss_weight=m.gshard_loss_weight,
            share_expert_init=m.share_expert_init,
            rngs=rngs,
        )

    def __call__(self, x, *, deterministic=True, rngs=None, drop_path_rate=None, **routing):
        kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        y = self.attn(self.norm1(x), **kw)
        x = x + drop_path(self.dropout(y, **kw), rate, **kw)
        y, aux = self.mlp(self.norm2(x), **kw, **routing)
        return x + drop_path(y.astype(x.dtype), rate, **kw), aux


class MoeEncoder(nnx.Module):
    """Encoder blocks (dense or MoE) and a final LayerNorm; returns ``(x, {block: aux})``.

    With ``scan_layers`` each repeated block pattern is one ``jax.lax.scan``: MoE every second
    block scans (dense, MoE) pairs; MoE in the last blocks scans the dense run below them and
    applies the rest unrolled (:func:`~flaxlab.nn.layers_scan.scan_segments`).
    """

    def __init__(self, config: VMoEConfig, *, rngs: nnx.Rngs):
        c = config
        self.remat = c.remat
        self.scan_layers = c.scan_layers
        common: dict[str, Any] = dict(
            dropout_rate=c.dropout_rate,
            attention=c.attention,
            dtype=resolve_dtype(c.dtype),
            rngs=rngs,
        )
        blocks = []
        for i in range(c.num_layers):
            rate = c.drop_path_rate * i / max(c.num_layers - 1, 1)
            if i in c.moe.layers:
                block = MoeEncoderBlock(
                    c.hidden_size, c.num_heads, c.mlp_dim, c.moe, drop_path_rate=rate, **common
                )
            else:
                block = EncoderBlock(
                    c.hidden_size, c.num_heads, c.mlp_dim, drop_path_rate=rate, **common
                )
            blocks.append(block)
        self.blocks = nnx.List(blocks)
        self.encoder_norm = nnx.LayerNorm(c.hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)

    def __call__(self, x, *, deterministic=True, rngs=None, **routing):
        def call(block, x, rngs, **overrides):
            kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs, **overrides)
            if isinstance(block, MoeEncoderBlock):
                return block(x, **kw, **routing)
            return block(x, **kw), None

        x, extras = run_blocks(
            self.blocks,
            x,
            call,
            rngs=rngs,
            remat=self.remat,
            scan=self.scan_layers,
            varying=("drop_path_rate",),
            owner="V-MoE",
        )
        aux = {i: extra for i, extra in enumerate(extras) if extra is not None}
        return self.encoder_norm(x), aux


class VMoE(ViT):
    config: VMoEConfig  # narrows ViT's
    # The ViT .npz layout holds no experts: V-MoE checkpoints are read by vmoe_checkpoints.
    pretrained_params = None  # type: ignore[assignment]
    pretrained_arrays = None  # type: ignore[assignment]
    """V-MoE classifier: ``model(images) -> (logits, aux)``.

    ``aux["aux_loss"]`` is the sum over MoE layers of their weighted auxiliary losses; per layer
    ``moe<i>_dropped_fraction``, ``moe<i>_router_entropy`` and ``moe<i>_max_load`` (the largest
    expert's share of assignments times ``E``; 1 = balanced) are metrics.
    """

    def __init__(self, config: VMoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, VMoEConfig):
            raise ValueError(f"VMoE needs a VMoEConfig, got {type(config).__name__}")
        super().__init__(config, rngs=rngs)
        bias = self.head.bias
        if config.head_bias_init and bias is not None:
            bias[...] = jnp.full_like(bias[...], config.head_bias_init)

    def make_encoder(self, rngs: nnx.Rngs) -> nnx.Module:
        return MoeEncoder(self.config, rngs=rngs)

    def moe_layers(self) -> list[MoeLayer]:
        blocks = self.encoder.blocks  # type: ignore[attr-defined]
        return [b.mlp for b in blocks if isinstance(b, MoeEncoderBlock)]  # type: ignore[misc]

    def set_routing(self, **settings) -> None:
        """Sets router attributes of every MoE layer, e.g. ``capacity_factor=2.0``."""
        allowed = ("num_selected_experts", "capacity_factor", "batch_priority")
        for name, value in settings.items():
            if name not in allowed:
                raise ValueError(f"set_routing({name}=...) is not a routing setting; {allowed}")
            for layer in self.moe_layers():
                setattr(layer.router, name, value)

    def __call__(
        self,
        images,
        *,
        deterministic=True,
        rngs=None,
        num_selected_experts: int | None = None,
        capacity_factor: float | None = None,
        batch_priority: bool | None = None,
    ):
        m = self.config.moe
        if capacity_factor is None and deterministic:
            capacity_factor = m.eval_capacity_factor
        x = self.embed(images, deterministic=deterministic, rngs=rngs)
        group = math.gcd(x.shape[0], m.group_images) * x.shape[1]
        x, layer_aux = self.encoder(
            x,
            deterministic=deterministic,
            rngs=rngs,
            num_selected_experts=num_selected_experts,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
            group_size=group,
        )
        logits = self.head(self.pool(x)).astype(jnp.float32)
        aux = {"aux_loss": jnp.zeros((), jnp.float32)}
        for i, a in layer_aux.items():
            aux["aux_loss"] = aux["aux_loss"] + a["auxiliary_loss"]
            aux[f"moe{i}_dropped_fraction"] = a["dropped_fraction"]
            aux[f"moe{i}_router_entropy"] = a["router_entropy"]
            aux[f"moe{i}_max_load"] = jnp.max(a["expert_load"]) * m.num_experts
            # Per-expert share of the assignments; the estimator logs one metric per expert.
            aux[f"moe{i}_expert_load"] = a["expert_load"]
        return logits, aux


def upcycle(dense: ViT, moe_model: VMoE) -> VMoE:
    """Initialises ``moe_model`` from a trained dense ``ViT`` of the same shape ("upcycling").

    Every parameter with the same path is copied; in MoE blocks each expert receives the dense
    MLP (``fc1``/``fc2`` kernel and bias repeated over the expert axis); routers keep their
    initialisation. Returns ``moe_model`` (updated in place).
    """
    dense_flat = {
        tuple(str(p) for p in key): v for key, v in nnx.to_flat_state(nnx.state(dense, nnx.Param))
    }
    moe_state = nnx.state(moe_model, nnx.Param)
    moe_flat = nnx.to_flat_state(moe_state)
    num_experts = moe_model.config.moe.num_experts
    updated = []
    for key, variable in moe_flat:
        path = tuple(str(p) for p in key)
        source = None
        if path in dense_flat:
            source = dense_flat[path][...]
        elif "experts" in path:
            layer, name = path[-1].split("_")  # fc1_kernel -> ("fc1", "kernel")
            dense_path = path[: path.index("experts")] + (layer, name)
            if dense_path in dense_flat:
                value = dense_flat[dense_path][...]
                source = jnp.broadcast_to(value, (num_experts, *value.shape))
        if source is not None:
            if source.shape != variable[...].shape:
                raise ValueError(
                    f"upcycle: {'/'.join(map(str, path))} has shape {variable[...].shape} in the "
                    f"V-MoE but {source.shape} in the dense model"
                )
            variable = variable.replace(jnp.asarray(source, variable[...].dtype))
        elif "router" not in path:
            raise ValueError(f"upcycle: the dense model has no {'/'.join(map(str, path))}")
        updated.append((key, variable))
    nnx.update(moe_model, nnx.from_flat_state(updated))
    return moe_model


def config_from_checkpoint(path, base: VMoEConfig, *, num_classes: int | None = None):
    """The config of the V-MoE a released checkpoint (``<prefix>.index``) describes, with
    ``base``'s image size, dtype, dropout, remat and layer scan, and ``num_classes`` (default:
    the checkpoint's)."""
    from flaxlab.models.vmoe_checkpoints import config_from_vmoe_params, read_vmoe_checkpoint

    params = read_vmoe_checkpoint(str(path), subtree=None)
    overrides = dict(
        image_size=base.image_size,
        dtype=base.dtype,
        dropout_rate=base.dropout_rate,
        drop_path_rate=base.drop_path_rate,
        remat=base.remat,
        scan_layers=base.scan_layers,
    )
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return config_from_vmoe_params(params, **overrides)


# The family of the model registry.
Config = VMoEConfig
Model = VMoE
Task = ClassificationTask
