"""The VDM module and its config (Kingma, Salimans, Poole & Ho 2021, arXiv 2107.00630).

The pure maths lives in ``maths.py``, the schedules in ``schedules.py``, the score network in
``unet.py``, the samplers in ``sampling.py`` and the ODE likelihood in ``likelihood.py``; this
module holds :class:`VDMConfig` with its presets, :class:`VDM` and the evaluation of bits/dim.

Example:
  >>> config = vdm_preset("digits")
  >>> model = VDM(config, rngs=nnx.Rngs(0))
  >>> loss, metrics = model.loss(images_uint8, labels, jax.random.key(1), deterministic=False)
  >>> samples = sample(model, jax.random.key(2), num=16, steps=100)  # uint8 [16, 8, 8, 1]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.models.vdm.maths import (
    antithetic_times,
    bits_per_dim,
    diffusion_loss,
    discretise_times,
    encode,
    prior_loss,
    reconstruction_loss,
)
from flaxlab.models.vdm.schedules import SCHEDULE_KINDS, make_schedule, with_variance_gradient
from flaxlab.models.vdm.unet import ScoreUNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class VDMConfig:
    """VDM hyper-parameters; defaults are the reference's CIFAR-10 model (30.6M parameters).

    Attributes:
      image_shape: ``(H, W, C)``.
      schedule: one of ``"fixed"``, ``"learned_scalar"`` (reference CIFAR-10), ``"learned_net"``.
      gamma_min, gamma_max: initial ``gamma(0)``/``gamma(1)`` and the score network's
        normalisation of ``gamma``.
      schedule_features: hidden width of the ``learned_net`` schedule (1024).
      pin_endpoints: ``learned_net`` only: endpoints as their own parameters (see
        :class:`MonotoneNetSchedule`); False is the reference exactly.
      schedule_hidden_init: ``learned_net`` only: standard deviation of the hidden layer's
        initial kernel (0.01 in the reference, where the shape hardly learns in short runs).
      schedule_learning_rate: ``learned_net`` with pinned endpoints only: the learning rate of
        the schedule's shape network as a multiple of the optimizer's (1 in the reference); the
        endpoints keep the optimizer's.
      variance_gradient: train a schedule's shape on the variance of the diffusion loss
        (paper App. I.2); only acts on schedules with shape parameters, in continuous time.
      timesteps: 0 = continuous time (reference CIFAR-10), else ``T``.
      width, depth, dropout, attention, fourier, groups: score network (``sm_n_embd``,
        ``sm_n_layer``, ``sm_pdrop``, ``with_attention``, ``with_fourier_features``, GroupNorm).
      num_classes: 0 = unconditional; else class-conditional with a "no label" embedding.
      label_dropout: probability of training on the "no label" row (classifier-free guidance).
      antithetic: antithetic (stratified) times in the training loss.
      sample_softmax: sample the final pixels from the decoder instead of its argmax.
      dtype: ``"float32"`` or ``"bfloat16"`` compute dtype of the score network.
    """

    image_shape: tuple[int, int, int] = (32, 32, 3)
    schedule: str = "learned_scalar"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    schedule_features: int = 1024
    pin_endpoints: bool = True
    schedule_hidden_init: float = 0.01
    schedule_learning_rate: float = 1.0
    variance_gradient: bool = True
    timesteps: int = 0
    width: int = 128
    depth: int = 32
    dropout: float = 0.1
    attention: bool = False
    fourier: bool = True
    groups: int = 32
    num_classes: int = 0
    label_dropout: float = 0.1
    antithetic: bool = True
    sample_softmax: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) positive, got {self.image_shape}")
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; accepted: {', '.join(SCHEDULE_KINDS)}"
            )
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")
        if not self.schedule_learning_rate > 0:
            raise ValueError(
                f"schedule_learning_rate must be > 0, got {self.schedule_learning_rate}"
            )
        if self.timesteps < 0:
            raise ValueError(f"timesteps must be >= 0 (0 = continuous), got {self.timesteps}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; accepted: {', '.join(_DTYPES)}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    @property
    def has_shape_network(self) -> bool:
        """The schedule has a shape network of its own (``learned_net`` with pinned endpoints)."""
        return self.schedule == "learned_net" and self.pin_endpoints

    @property
    def shape_on_variance(self) -> bool:
        """The shape network is trained on the loss variance (continuous time only)."""
        return self.has_shape_network and self.variance_gradient and self.timesteps == 0


VDM_PRESETS: dict[str, VDMConfig] = {
    # google-research/vdm configs/cifar10.py: 32 blocks of 128 channels, Fourier features,
    # middle attention only, dropout 0.1, learned scalar schedule, continuous time.
    "cifar10": VDMConfig(),
    # The bundled 8x8 scikit-learn digits quantised to 256 levels; a CPU-sized network.
    "digits": VDMConfig(image_shape=(8, 8, 1), width=32, depth=4, groups=8, dropout=0.1),
    "digits-conditional": VDMConfig(
        image_shape=(8, 8, 1), width=32, depth=4, groups=8, dropout=0.1, num_classes=10
    ),
}


def vdm_preset(name: str, **overrides) -> VDMConfig:
    """A named preset, with optional field overrides."""
    if name not in VDM_PRESETS:
        raise ValueError(f"unknown VDM preset {name!r}; accepted: {', '.join(VDM_PRESETS)}")
    return dataclasses.replace(VDM_PRESETS[name], **overrides)


_STREAMS = ("sample", "default", "dropout", "noise")


def _as_key(rngs) -> jax.Array:
    """A PRNG key from a key or an ``nnx.Rngs`` (streams tried: sample, default, dropout, noise)."""
    if isinstance(rngs, nnx.Rngs):
        for name in _STREAMS:
            if name in rngs:
                return getattr(rngs, name)()
        raise ValueError(
            f"nnx.Rngs passed to VDM has none of the streams {', '.join(_STREAMS)}; "
            "add one (e.g. nnx.Rngs(sample=seed)) or pass a PRNG key"
        )
    return rngs


class VDM(nnx.Module):
    """A VDM: noise schedule (``.schedule``) + score network (``.score``).

    Args:
      config: a :class:`VDMConfig`.
      rngs: ``nnx.Rngs`` for the parameters.
    """

    def __init__(self, config: VDMConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = {}
        if config.schedule == "learned_net":
            kw = dict(
                features=config.schedule_features,
                pin_endpoints=config.pin_endpoints,
                hidden_init=config.schedule_hidden_init,
            )
        self.schedule = make_schedule(
            config.schedule, config.gamma_min, config.gamma_max, rngs=rngs, **kw
        )
        self.score = ScoreUNet(
            config.image_shape[-1],
            width=config.width,
            depth=config.depth,
            gamma_min=config.gamma_min,
            gamma_max=config.gamma_max,
            dropout=config.dropout,
            attention=config.attention,
            fourier=config.fourier,
            num_classes=config.num_classes,
            groups=config.groups,
            dtype=_DTYPES[config.dtype],
            rngs=rngs,
        )

    def _check_images(self, images) -> None:
        if tuple(images.shape[1:]) != tuple(self.config.image_shape):
            raise ValueError(
                f"images have shape {tuple(images.shape)}; this model takes "
                f"[B, {', '.join(map(str, self.config.image_shape))}]"
            )

    def _labels(self, labels, batch: int, key, deterministic: bool):
        cfg = self.config
        if cfg.num_classes == 0:
            return None
        null = jnp.full((batch,), cfg.num_classes, jnp.int32)
        if labels is None:
            return null
        labels = jnp.asarray(labels, jnp.int32)
        if deterministic or cfg.label_dropout == 0.0:
            return labels
        drop = jax.random.bernoulli(key, cfg.label_dropout, (batch,))
        return jnp.where(drop, null, labels)

    def per_example_losses(self, images, labels, rng, *, deterministic: bool, times=None):
        """``(recon, prior, diffusion)`` per-example losses in nats, each ``[B]``.

        Args:
          images: uint8 ``[B, H, W, C]``.
          labels: int ``[B]`` or None.
          rng: PRNG key (or ``nnx.Rngs``) for the noise, the times, dropout and label dropout.
          deterministic: no dropout and no label dropout.
          times: ``[B]`` diffusion times; default antithetic (or i.i.d.) uniform draws.
        """
        cfg = self.config
        self._check_images(images)
        batch = images.shape[0]
        k_eps0, k_t, k_eps, k_drop, k_label = jax.random.split(_as_key(rng), 5)
        f = encode(images)
        g0, g1 = self.schedule.endpoints()
        recon = reconstruction_loss(images, jax.random.normal(k_eps0, f.shape), g0)
        prior = prior_loss(images, g1)
        if times is None:
            if cfg.antithetic:
                times = antithetic_times(jax.random.uniform(k_t), batch)
            else:
                times = jax.random.uniform(k_t, (batch,))
        t = discretise_times(times, cfg.timesteps)
        eps = jax.random.normal(k_eps, f.shape)
        labels = self._labels(labels, batch, k_label, deterministic)
        dropout_key = None if deterministic else k_drop

        def eps_hat_at(net, gamma_t):
            alpha = jnp.sqrt(jax.nn.sigmoid(-gamma_t))[:, None, None, None]
            sigma = jnp.sqrt(jax.nn.sigmoid(gamma_t))[:, None, None, None]
            return net(alpha * f + sigma * eps, gamma_t, labels, dropout_key=dropout_key)

        if cfg.shape_on_variance:
            graphdef, net_state = nnx.split(self.score)
            nu, dnu = jax.jvp(self.schedule.shape, (t,), (jnp.ones_like(t),))

            def per_example(shape_values, other):
                nu_t, dnu_t = shape_values
                e0, e1, state = other
                gamma_t = e0 + (e1 - e0) * nu_t
                eps_hat = eps_hat_at(nnx.merge(graphdef, state), gamma_t)
                mse = jnp.sum(jnp.square(eps - eps_hat).reshape(batch, -1), axis=1)
                return 0.5 * (e1 - e0) * dnu_t * mse

            diff = with_variance_gradient(
                per_example, (nu, dnu), (g0, g1, net_state), 1.0 / (cfg.num_dims * math.log(2.0))
            )
        else:
            eps_hat = eps_hat_at(self.score, self.schedule(t))
            diff = diffusion_loss(f, t, eps, eps_hat, self.schedule, cfg.timesteps)
        return recon, prior, diff

    def loss(self, images, labels=None, rngs=None, *, deterministic: bool = False):
        """Training objective: mean bits/dim over the batch and its terms.

        Args:
          images: uint8 ``[B, H, W, C]``.
          labels: int ``[B]`` or None (ignored by unconditional models).
          rngs: PRNG key or ``nnx.Rngs``.
          deterministic: disable dropout and label dropout.

        Returns:
          ``(bpd, metrics)`` with metrics ``bpd``, ``bpd_recon``, ``bpd_prior``, ``bpd_diff``,
          ``gamma_0``, ``gamma_1``.
        """
        if rngs is None:
            raise ValueError("VDM.loss needs rngs (a PRNG key or nnx.Rngs), got None")
        recon, prior, diff = self.per_example_losses(
            images, labels, rngs, deterministic=deterministic
        )
        metrics = bits_per_dim(recon, prior, diff, self.config.num_dims)
        g0, g1 = self.schedule.endpoints()
        metrics["gamma_0"], metrics["gamma_1"] = g0, g1
        # The shape at mid-time (0.5 for a linear schedule): shows the schedule learning.
        metrics["schedule_mid"] = self.schedule.shape(jnp.float32(0.5))
        return metrics["bpd"], metrics


def evaluate_bpd(model: VDM, images, labels, rng, num_draws: int = 4) -> dict[str, jax.Array]:
    """Per-image bits/dim, each averaged over ``num_draws`` draws of ``(t, eps)``.

    The ``K = num_draws`` times of image ``i`` are ``(u_i + k / K) mod 1`` (stratified, so the
    average is unbiased with lower variance than ``K`` independent draws). No dropout.

    Args:
      model: a :class:`VDM`.
      images: uint8 ``[B, H, W, C]``; labels: int ``[B]`` or None.
      rng: PRNG key.
      num_draws: ``K >= 1``.

    Returns:
      ``{"bpd", "bpd_recon", "bpd_prior", "bpd_diff"}``, each ``[B]`` (per image). Sum these and
      their squares over a test set and use :func:`bpd_confidence_interval`.
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    batch = images.shape[0]
    k_u, k_draws = jax.random.split(_as_key(rng))
    u = jax.random.uniform(k_u, (batch,))
    scale = 1.0 / (model.config.num_dims * math.log(2.0))

    def one_draw(k):
        times = jnp.mod(u + k / num_draws, 1.0)
        key = jax.random.fold_in(k_draws, k)
        return model.per_example_losses(images, labels, key, deterministic=True, times=times)

    recon, prior, diff = jax.lax.map(one_draw, jnp.arange(num_draws))
    out = {
        "bpd_recon": jnp.mean(recon, 0) * scale,
        "bpd_prior": jnp.mean(prior, 0) * scale,
        "bpd_diff": jnp.mean(diff, 0) * scale,
    }
    out["bpd"] = out["bpd_recon"] + out["bpd_prior"] + out["bpd_diff"]
    return out


def evaluation_sums(model: VDM, images, labels, rng, num_draws: int = 4) -> dict[str, jax.Array]:
    """Summed per-image bits/dim of a batch, for accumulation over a test set.

    Returns ``{"bpd_sum", "bpd_sq_sum", "bpd_recon_sum", "bpd_prior_sum", "bpd_diff_sum",
    "count"}``; after summing over batches, :func:`bpd_confidence_interval` of
    ``(bpd_sum, bpd_sq_sum, count)`` gives the test bits/dim and its 95% interval.
    """
    per_image = evaluate_bpd(model, images, labels, rng, num_draws)
    out = {f"{k}_sum": jnp.sum(v) for k, v in per_image.items()}
    out["bpd_sq_sum"] = jnp.sum(jnp.square(per_image["bpd"]))
    out["count"] = jnp.asarray(images.shape[0], jnp.float32)
    return out


def bpd_confidence_interval(total, total_sq, count, z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of a normal confidence interval from per-image sums.

    Args:
      total: sum of per-image bits/dim; total_sq: sum of their squares; count: images.
      z: normal quantile (1.96 for 95%).

    Returns:
      ``(mean, half_width)``; the half-width is ``z * std / sqrt(count)`` (0 for one image).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    mean = float(total) / count
    if count == 1:
        return mean, 0.0
    var = max(float(total_sq) / count - mean * mean, 0.0) * count / (count - 1)
    return mean, z * math.sqrt(var / count)
