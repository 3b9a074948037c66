"""Variational Diffusion Models: the maths as pure functions.

Notation (Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models",
https://arxiv.org/abs/2107.00630): the noise schedule is ``gamma(t) = -log SNR(t)``,
``sigma_t^2 = sigmoid(gamma(t))``, ``alpha_t^2 = sigmoid(-gamma(t))`` and
``z_t = alpha_t x + sigma_t eps``. Every function here works in float32 whatever the
dtype of its inputs (under bf16 training these are the float32 islands), and returns
one value per example, in nats, unless said otherwise.

All functions are re-exported by :mod:`flaxlab.models.vdm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

VOCAB_SIZE = 256


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def encode(x) -> jax.Array:
    r"""Maps integer pixels ``0..255`` to the centres of 256 bins in ``[-1, 1]``.

    .. math:: f = 2 (x + 1/2) / 256 - 1

    Args:
      x: integer (or integer-valued) pixels of any shape.

    Returns:
      float32 array of the same shape with values in ``[-255/256, 255/256]``.

    Example:
      >>> encode(jnp.array([0, 255], jnp.uint8))  # [-0.99609375, 0.99609375]
    """
    return 2.0 * ((_f32(x) + 0.5) / VOCAB_SIZE) - 1.0


def decoder_logits(z_rescaled, gamma_0) -> jax.Array:
    r"""Log-probabilities of the 256 pixel values given a rescaled latent ``z_0 / alpha_0``.

    .. math:: \log p(x = k \mid z) = \mathrm{log\_softmax}_k\bigl(
              -\tfrac12 e^{-\gamma_0} (z - f_k)^2\bigr)

    with ``f_k = encode(k)``. The pixels are independent given ``z``, so the logits are exact.

    Args:
      z_rescaled: latents divided by ``alpha_0``, any shape ``S``.
      gamma_0: ``gamma(0)``, a scalar or an array broadcastable against ``S``.

    Returns:
      float32 array of shape ``S + (256,)``.
    """
    z = _f32(z_rescaled)
    inv_stdev = jnp.exp(-0.5 * _f32(gamma_0))[..., None]
    values = encode(jnp.arange(VOCAB_SIZE))
    logits = -0.5 * jnp.square((z[..., None] - values) * inv_stdev)
    return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_loss(x, eps, gamma_0) -> jax.Array:
    r"""``-log p(x | z_0)`` per example, in nats.

    As the reference, the latent is sampled already divided by ``alpha_0``:
    ``z = f + exp(gamma_0 / 2) eps`` (``sigma_0 / alpha_0 = exp(gamma_0 / 2)``), and the
    decoder is :func:`decoder_logits`.

    Args:
      x: uint8 pixels ``[B, ...]``.
      eps: standard normal noise, same shape as ``x``.
      gamma_0: scalar ``gamma(0)``.

    Returns:
      float32 ``[B]``.
    """
    f = encode(x)
    gamma_0 = _f32(gamma_0)
    z = f + jnp.exp(0.5 * gamma_0) * _f32(eps)
    logprobs = decoder_logits(z, gamma_0)
    index = jnp.round(_f32(x)).astype(jnp.int32)[..., None]
    logprob = jnp.take_along_axis(logprobs, index, axis=-1)[..., 0]
    return -jnp.sum(logprob.reshape(logprob.shape[0], -1), axis=1)


def prior_loss(x, gamma_1) -> jax.Array:
    r"""``KL(q(z_1 | x) || N(0, I))`` per example, in nats.

    .. math:: \tfrac12 \sum_i \bigl(\alpha_1^2 f_i^2 + \sigma_1^2 - \log \sigma_1^2 - 1\bigr)

    with ``sigma_1^2 = sigmoid(gamma_1)``, ``alpha_1^2 = sigmoid(-gamma_1)`` and
    ``log sigma_1^2 = -softplus(-gamma_1)`` (exact for large ``gamma_1``).

    Args:
      x: uint8 pixels ``[B, ...]``.
      gamma_1: scalar ``gamma(1)``.

    Returns:
      float32 ``[B]``.
    """
    f = encode(x)
    gamma_1 = _f32(gamma_1)
    var_1 = jax.nn.sigmoid(gamma_1)
    alpha_sq = jax.nn.sigmoid(-gamma_1)
    log_var_1 = -jax.nn.softplus(-gamma_1)
    terms = alpha_sq * jnp.square(f) + var_1 - log_var_1 - 1.0
    return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=1)


def discretise_times(t, timesteps: int) -> jax.Array:
    """Rounds ``t`` up to the grid ``{1/T, ..., 1}`` (identity when ``timesteps == 0``)."""
    if timesteps < 0:
        raise ValueError(f"timesteps must be >= 0 (0 = continuous time), got {timesteps}")
    t = _f32(t)
    if timesteps == 0:
        return t
    return jnp.ceil(t * timesteps) / timesteps


def diffusion_loss(
    f, t, eps, eps_hat, gamma: Callable[[jax.Array], jax.Array], timesteps: int = 0
) -> jax.Array:
    r"""The diffusion term of the VLB per example, in nats.

    Continuous time (``timesteps == 0``):

    .. math:: \tfrac12 \gamma'(t) \lVert \epsilon - \hat\epsilon \rVert^2

    with ``gamma'`` by forward-mode differentiation (``jax.jvp``). Discrete time ``T``:

    .. math:: \tfrac12 T \,\mathrm{expm1}\bigl(\gamma(t) - \gamma(t - 1/T)\bigr)
              \lVert \epsilon - \hat\epsilon \rVert^2,\quad t \leftarrow \lceil tT \rceil / T

    (the rounding is done here; ``eps_hat`` must have been computed at the rounded ``t``).

    Args:
      f: encoded data ``[B, ...]`` (only its shape is used; kept for the reference's signature).
      t: times ``[B]`` in ``[0, 1]``.
      eps: the noise that made ``z_t``, ``[B, ...]``.
      eps_hat: the score network's prediction of ``eps``, ``[B, ...]``.
      gamma: the schedule, a callable from times ``[B]`` to ``gamma(t)`` ``[B]``.
      timesteps: 0 for continuous time, else the number of steps ``T``.

    Returns:
      float32 ``[B]``.

    Example:
      >>> gamma = lambda t: -13.3 + 18.3 * t
      >>> diffusion_loss(f, t, eps, eps_hat, gamma)  # 0.5 * 18.3 * ||eps - eps_hat||^2
    """
    del f
    t = discretise_times(t, timesteps)
    err = jnp.square(_f32(eps) - _f32(eps_hat))
    mse = jnp.sum(err.reshape(err.shape[0], -1), axis=1)
    if timesteps == 0:
        _, gamma_grad = jax.jvp(lambda u: _f32(gamma(u)), (t,), (jnp.ones_like(t),))
        return 0.5 * gamma_grad * mse
    gamma_t = _f32(gamma(t))
    gamma_s = _f32(gamma(t - 1.0 / timesteps))
    return 0.5 * timesteps * jnp.expm1(gamma_t - gamma_s) * mse


def antithetic_times(t0, batch_size: int) -> jax.Array:
    """Low-discrepancy times ``(t0 + arange(B) / B) mod 1``, exactly ``B`` of them.

    The reference builds the offsets with ``arange(0, 1, 1/B)``, which yields ``B + 1``
    values for some ``B`` (49, 98, 103, ...); ``arange(B) / B`` never does.

    Args:
      t0: a uniform scalar in ``[0, 1)``.
      batch_size: ``B >= 1``.

    Returns:
      float32 ``[B]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    offsets = jnp.arange(batch_size, dtype=jnp.float32) / batch_size
    return jnp.mod(_f32(t0) + offsets, 1.0)


def _expand(v, like) -> jax.Array:
    v = _f32(v)
    return v.reshape(v.shape + (1,) * (jnp.ndim(like) - v.ndim))


def ancestral_step(z_t, eps_hat, eps, gamma_s, gamma_t) -> jax.Array:
    r"""One step ``z_t -> z_s`` (``s < t``) of the reference's ancestral sampler.

    .. math:: z_s = \sqrt{\alpha_s^2 / \alpha_t^2}\,(z_t - \sigma_t c\,\hat\epsilon)
                    + \sqrt{\sigma_s^2 c}\,\epsilon,\quad c = -\mathrm{expm1}(\gamma_s - \gamma_t)

    Args:
      z_t: latents ``[B, ...]``.
      eps_hat: predicted noise at ``(z_t, t)``.
      eps: fresh standard normal noise.
      gamma_s, gamma_t: ``gamma(s)``, ``gamma(t)``: scalars or ``[B]``.

    Returns:
      float32 ``z_s``, same shape as ``z_t``.
    """
    gamma_s = _expand(gamma_s, z_t)
    gamma_t = _expand(gamma_t, z_t)
    c = -jnp.expm1(gamma_s - gamma_t)
    sigma_t = jnp.sqrt(jax.nn.sigmoid(gamma_t))
    mean = jnp.sqrt(jax.nn.sigmoid(-gamma_s) / jax.nn.sigmoid(-gamma_t)) * (
        _f32(z_t) - sigma_t * c * _f32(eps_hat)
    )
    return mean + jnp.sqrt(jax.nn.sigmoid(gamma_s) * c) * _f32(eps)


def ddim_step(z_t, eps_hat, gamma_s, gamma_t) -> jax.Array:
    r"""One deterministic DDIM step ``z_t -> z_s``, the exponential integrator in log-SNR.

    With ``lambda = -gamma`` (log-SNR) and ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``:

    .. math:: z_s = \alpha_s \hat x + \sigma_s \hat\epsilon
              = \frac{\alpha_s}{\alpha_t} z_t
              - \sigma_s\,\mathrm{expm1}\bigl(\tfrac12(\gamma_t - \gamma_s)\bigr)\hat\epsilon

    the exact solution of the probability-flow ODE when ``eps_hat`` is constant in
    ``lambda`` over the step (DPM-Solver-1; Song et al. 2021, Lu et al. 2022).

    Args:
      z_t: latents ``[B, ...]``.
      eps_hat: predicted noise at ``(z_t, t)``.
      gamma_s, gamma_t: ``gamma(s)``, ``gamma(t)``: scalars or ``[B]``, ``gamma_s < gamma_t``.

    Returns:
      float32 ``z_s``.
    """
    gamma_s = _expand(gamma_s, z_t)
    gamma_t = _expand(gamma_t, z_t)
    ratio = jnp.sqrt(jax.nn.sigmoid(-gamma_s) / jax.nn.sigmoid(-gamma_t))
    sigma_s = jnp.sqrt(jax.nn.sigmoid(gamma_s))
    return ratio * _f32(z_t) - sigma_s * jnp.expm1(0.5 * (gamma_t - gamma_s)) * _f32(eps_hat)


def bits_per_dim(recon, prior, diffusion, num_dims: int) -> dict[str, jax.Array]:
    """Mean bits per dimension of the three VLB terms and their sum.

    Args:
      recon, prior, diffusion: per-example losses in nats, ``[B]`` each.
      num_dims: dimensions per example (``H * W * C``).

    Returns:
      ``{"bpd", "bpd_recon", "bpd_prior", "bpd_diff"}``, float32 scalars.
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    scale = 1.0 / (num_dims * math.log(2.0))
    out = {
        "bpd_recon": jnp.mean(_f32(recon)) * scale,
        "bpd_prior": jnp.mean(_f32(prior)) * scale,
        "bpd_diff": jnp.mean(_f32(diffusion)) * scale,
    }
    out["bpd"] = out["bpd_recon"] + out["bpd_prior"] + out["bpd_diff"]
    return out


def timestep_embedding(t, dim: int) -> jax.Array:
    r"""Sinusoidal embedding of ``1000 t`` (tensor2tensor layout ``[sin, cos]``).

    Frequencies ``exp(-k log(10000) / (dim/2 - 1))`` for ``k < dim/2``; odd ``dim`` is zero padded.

    Args:
      t: ``[B]`` values (VDM passes ``gamma`` normalised to ``[0, 1]``).
      dim: embedding size, ``>= 4``.

    Returns:
      float32 ``[B, dim]``.
    """
    if dim < 4:
        raise ValueError(f"embedding dim must be >= 4, got {dim}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (_f32(t) * 1000.0)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_features(z, start: int = 6, stop: int = 8) -> jax.Array:
    r"""Base-2 Fourier features ``sin/cos(2^n 2\pi z)`` for ``n`` in ``[start, stop)``.

    Layout as the reference: channel-major (channel ``c``, then frequency), all sines then
    all cosines: ``[sin(c0 n6), sin(c0 n7), sin(c1 n6), ..., cos(c0 n6), ...]``.

    Args:
      z: ``[..., C]``.

    Returns:
      float32 ``[..., 2 C (stop - start)]``.
    """
    if stop <= start:
        raise ValueError(f"need start < stop, got start={start}, stop={stop}")
    z = _f32(z)
    n = stop - start
    w = 2.0 ** jnp.arange(start, stop, dtype=jnp.float32) * 2.0 * math.pi
    h = jnp.repeat(z, n, axis=-1) * jnp.tile(w, z.shape[-1])
    return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)
