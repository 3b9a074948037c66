"""VDM's score network: a U-Net without down-sampling (the reference's ``ScoreUNet``).

Structure (Kingma et al. 2021, App. B; google-research/vdm ``model_vdm.py``):
conditioning ``c = swish(dense1(swish(dense0([temb(gamma_norm), label_value]))))`` with
``gamma_norm = (gamma_t - gamma_min) / (gamma_max - gamma_min)`` and ``temb`` the sinusoidal
embedding of ``1000 gamma_norm``; input ``[z, fourier(z)]`` -> ``conv_in`` -> ``depth`` ResNet
blocks (each optionally followed by attention) keeping every activation -> middle
(ResNet, attention, ResNet) -> ``depth + 1`` ResNet blocks each taking the concatenation with a
kept activation -> GroupNorm, swish, ``conv_out`` (zero-initialised) -> ``eps_hat = z + out``
(the base measure: an untrained network predicts ``eps_hat = z``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.models.vdm.maths import fourier_features, timestep_embedding

_zeros = nnx.initializers.zeros_init()


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class ResnetBlock(nnx.Module):
    """GroupNorm, swish, conv3x3, + projected conditioning, GroupNorm, swish, dropout,
    zero-initialised conv3x3, residual (``nin_shortcut`` dense when channels change)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        *,
        dropout: float,
        groups: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.dropout = dropout
        self.norm1 = nnx.GroupNorm(in_channels, groups, dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
        self.cond_proj = nnx.Linear(
            cond_dim, out_channels, use_bias=False, kernel_init=_zeros, dtype=dtype, rngs=rngs
        )
        self.norm2 = nnx.GroupNorm(out_channels, groups, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(
            out_channels, out_channels, (3, 3), kernel_init=_zeros, dtype=dtype, rngs=rngs
        )
        self.nin_shortcut = (
            nnx.Linear(in_channels, out_channels, dtype=dtype, rngs=rngs)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x, cond, dropout_key=None) -> jax.Array:
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = h + self.cond_proj(cond)[:, None, None, :]
        h = _dropout(nnx.swish(self.norm2(h)), self.dropout, dropout_key)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all ``H * W`` positions, residual, zero-initialised
    output projection; logits and softmax in float32."""

    def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(channels, groups, dtype=dtype, rngs=rngs)
        self.query = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(channels, channels, kernel_init=_zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.norm(x)
        q = self.query(h).reshape(b, hgt * wid, c)
        k = self.key(h).reshape(b, hgt * wid, c)
        v = self.value(h).reshape(b, hgt * wid, c)
        logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32), k.astype(jnp.float32))
        weights = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(c)), axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
        return x + self.out(h)


class ScoreUNet(nnx.Module):
    """Epsilon-prediction network ``eps_hat(z_t, gamma_t, label)``.

    Args:
      channels: image channels ``C``.
      width: feature channels of every block (``sm_n_embd``; 128 for CIFAR-10).
      depth: ResNet blocks on the way down (``sm_n_layer``; 32 for CIFAR-10).
      gamma_min, gamma_max: normalisation of ``gamma_t`` for the conditioning (the config's
        constants, never the learned endpoints, so the network's input for a given ``gamma``
        does not move while the schedule learns).
      dropout: dropout rate in the ResNet blocks.
      attention: attention after every down/up block (the middle always has one).
      fourier: concatenate Fourier features at ``2^6`` and ``2^7`` to the input.
      num_classes: 0 for unconditional; else a label embedding with ``num_classes + 1`` rows
        (the last one is the "no label" row used for classifier-free guidance).
      groups: GroupNorm groups (32 in the reference); must divide ``width``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters, conditioning, Fourier
        features and the output stay float32.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        channels: int,
        *,
        width: int,
        depth: int,
        gamma_min: float,
        gamma_max: float,
        dropout: float = 0.1,
        attention: bool = False,
        fourier: bool = True,
        num_classes: int = 0,
        groups: int = 32,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % groups:
            raise ValueError(f"width {width} must be divisible by groups {groups}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.width, self.depth = width, depth
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.fourier, self.attention, self.num_classes = fourier, attention, num_classes
        self.dtype = dtype
        cond_dim = 4 * width
        self.dense0 = nnx.Linear(width + 1, cond_dim, rngs=rngs)
        self.dense1 = nnx.Linear(cond_dim, cond_dim, rngs=rngs)
        self.label_embedding = (
            nnx.Embed(num_classes + 1, cond_dim, rngs=rngs) if num_classes > 0 else None
        )
        in_ch = channels * (5 if fourier else 1)
        self.conv_in = nnx.Conv(in_ch, width, (3, 3), dtype=dtype, rngs=rngs)
        kw: dict[str, Any] = dict(dropout=dropout, groups=groups, dtype=dtype, rngs=rngs)
        self.down = nnx.List([ResnetBlock(width, width, cond_dim, **kw) for _ in range(depth)])
        self.mid_block1 = ResnetBlock(width, width, cond_dim, **kw)
        self.mid_attn = AttentionBlock(width, groups=groups, dtype=dtype, rngs=rngs)
        self.mid_block2 = ResnetBlock(width, width, cond_dim, **kw)
        self.up = nnx.List(
            [ResnetBlock(2 * width, width, cond_dim, **kw) for _ in range(depth + 1)]
        )
        n_attn = depth if attention else 0
        attn_kw: dict[str, Any] = dict(groups=groups, dtype=dtype, rngs=rngs)
        self.down_attn = nnx.List([AttentionBlock(width, **attn_kw) for _ in range(n_attn)])
        self.up_attn = nnx.List(
            [AttentionBlock(width, **attn_kw) for _ in range(n_attn + (1 if attention else 0))]
        )
        self.norm_out = nnx.GroupNorm(width, groups, dtype=dtype, rngs=rngs)
        self.conv_out = nnx.Conv(width, channels, (3, 3), kernel_init=_zeros, rngs=rngs)

    def conditioning(self, gamma_t, labels=None) -> jax.Array:
        """The conditioning vector ``[B, 4 width]`` (float32)."""
        g = jnp.asarray(gamma_t, jnp.float32)
        t = (g - self.gamma_min) / (self.gamma_max - self.gamma_min)
        emb = timestep_embedding(t, self.width)
        cond = jnp.concatenate([emb, jnp.zeros((emb.shape[0], 1), jnp.float32)], axis=1)
        cond = nnx.swish(self.dense1(nnx.swish(self.dense0(cond))))
        if self.label_embedding is not None:
            if labels is None:
                labels = jnp.full((emb.shape[0],), self.num_classes, jnp.int32)
            cond = cond + self.label_embedding(jnp.asarray(labels, jnp.int32))
        return cond

    def __call__(self, z, gamma_t, labels=None, *, dropout_key=None) -> jax.Array:
        """``eps_hat`` for latents ``z`` ``[B, H, W, C]`` and ``gamma_t`` (scalar or ``[B]``).

        ``labels``: int ``[B]`` (``num_classes`` = no label) or None. ``dropout_key``: a PRNG
        key to apply dropout (training), None for deterministic evaluation.
        """
        z = jnp.asarray(z, jnp.float32)
        gamma_t = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (z.shape[0],))
        cond = self.conditioning(gamma_t, labels)
        h = jnp.concatenate([z, fourier_features(z)], axis=-1) if self.fourier else z
        h = self.conv_in(h)
        keys = (
            list(jax.random.split(dropout_key, 2 * self.depth + 3))
            if dropout_key is not None
            else [None] * (2 * self.depth + 3)
        )
        kept = [h]
        for i, block in enumerate(self.down):
            h = block(kept[-1], cond, keys[i])
            if self.attention:
                h = self.down_attn[i](h)
            kept.append(h)
        h = self.mid_block1(kept[-1], cond, keys[self.depth])
        h = self.mid_attn(h)
        h = self.mid_block2(h, cond, keys[self.depth + 1])
        for i, block in enumerate(self.up):
            h = block(jnp.concatenate([h, kept.pop()], axis=-1), cond, keys[self.depth + 2 + i])
            if self.attention:
                h = self.up_attn[i](h)
        h = nnx.swish(self.norm_out(h))
        out = self.conv_out(h.astype(jnp.float32))
        return z + out
