"""Samplers for :class:`flaxlab.models.vdm.VDM`: the reference's ancestral sampler and DDIM.

Both run ``steps`` network evaluations on the grid ``t_i = (steps - i) / steps`` inside one
``jax.jit``-compiled ``lax.fori_loop``, then decode ``z_0`` with the model's decoder
(argmax of :func:`~flaxlab.models.vdm.maths.decoder_logits` of ``z_0 / alpha_0``, or a sample
from it with ``config.sample_softmax``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlab.models.vdm.maths import ancestral_step, ddim_step, decoder_logits

SAMPLERS = ("ancestral", "ddim")


def _guided_eps(model, z, gamma_t, labels, guidance: float):
    net = model.score
    batch = z.shape[0]
    gamma_t = jnp.broadcast_to(gamma_t, (batch,))
    if model.config.num_classes == 0:
        return net(z, gamma_t)
    null = jnp.full((batch,), model.config.num_classes, jnp.int32)
    if labels is None:
        return net(z, gamma_t, null)
    conditional = net(z, gamma_t, labels)
    if guidance == 0.0:
        return conditional
    return (1.0 + guidance) * conditional - guidance * net(z, gamma_t, null)


@functools.partial(jax.jit, static_argnames=("graphdef", "num", "steps", "sampler", "guidance"))
def _sample(graphdef, state, rng, labels, *, num, steps, sampler, guidance):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    k_init, k_loop, k_out = jax.random.split(rng, 3)
    z = jax.random.normal(k_init, (num, *cfg.image_shape), jnp.float32)

    def body(i, z_t):
        t = (steps - i) / steps
        s = (steps - i - 1) / steps
        gamma_t, gamma_s = model.schedule(t), model.schedule(s)
        eps_hat = _guided_eps(model, z_t, gamma_t, labels, guidance)
        if sampler == "ancestral":
            noise = jax.random.normal(jax.random.fold_in(k_loop, i), z_t.shape)
            return ancestral_step(z_t, eps_hat, noise, gamma_s, gamma_t)
        return ddim_step(z_t, eps_hat, gamma_s, gamma_t)

    z_0 = jax.lax.fori_loop(0, steps, body, z)
    gamma_0 = model.schedule(jnp.float32(0.0))
    logits = decoder_logits(z_0 / jnp.sqrt(jax.nn.sigmoid(-gamma_0)), gamma_0)
    if cfg.sample_softmax:
        pixels = jax.random.categorical(k_out, logits)
    else:
        pixels = jnp.argmax(logits, axis=-1)
    return pixels.astype(jnp.uint8)


def sample(
    model,
    rng,
    num: int,
    steps: int | None = None,
    *,
    sampler: str = "ancestral",
    guidance: float = 0.0,
    labels=None,
) -> jax.Array:
    r"""Draws ``num`` images from a :class:`~flaxlab.models.vdm.VDM`.

    * ``"ancestral"``: the reference's sampler (:func:`~flaxlab.models.vdm.maths.ancestral_step`),
      exact in the limit of many steps; the reference uses ``steps = T`` (1000 in continuous time).
    * ``"ddim"``: deterministic DDIM / first-order exponential integrator of the
      probability-flow ODE in log-SNR (:func:`~flaxlab.models.vdm.maths.ddim_step`); usable with
      few steps (25-100).

    Classifier-free guidance (class-conditional models):
    ``eps = (1 + w) eps(z, y) - w eps(z, null)`` with ``w = guidance``; ``labels=None``
    samples unconditionally (the "no label" row).

    Args:
      model: a VDM.
      rng: PRNG key.
      num: number of images.
      steps: network evaluations (times two with guidance); default the model's discrete
        ``timesteps`` ``T`` if it has them, else 1000 (the reference's choice).
      sampler: ``"ancestral"`` or ``"ddim"``.
      guidance: ``w >= 0``.
      labels: int ``[num]`` or None.

    Returns:
      uint8 ``[num, H, W, C]``.

    Example:
      >>> images = sample(model, jax.random.key(0), num=64, steps=1000)
    """
    if steps is None:
        steps = model.config.timesteps or 1000
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if num < 1 or steps < 1:
        raise ValueError(f"num and steps must be >= 1, got num={num}, steps={steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (num,):
            raise ValueError(f"labels must have shape ({num},), got {labels.shape}")
    graphdef, state = nnx.split(model)
    return _sample(
        graphdef,
        state,
        rng,
        labels,
        num=num,
        steps=steps,
        sampler=sampler,
        guidance=float(guidance),
    )


def image_grid(images, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """Tiles uint8 images ``[N, H, W, C]`` into one ``[rows (H + p) + p, cols (W + p) + p, C]``
    uint8 array (padding 0 = black), e.g. for ``PIL.Image.fromarray(grid.squeeze(-1))``.

    Args:
      images: ``[N, H, W, C]`` uint8.
      columns: images per row; default ``ceil(sqrt(N))``.
      padding: pixels between and around images.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    if columns < 1 or padding < 0:
        raise ValueError(f"need columns >= 1 and padding >= 0, got {columns}, {padding}")
    rows = math.ceil(n / columns)
    grid = np.zeros(
        (rows * (h + padding) + padding, columns * (w + padding) + padding, c), images.dtype
    )
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def sample_images(
    model,
    *,
    num: int,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    labels=None,
    output: str | Path,
) -> Path:
    """Samples ``num`` images from a :class:`~flaxlab.models.vdm.VDM` with :func:`sample` and
    writes them as one PNG grid (upscaled to at least 256 pixels for small images)."""
    from PIL import Image

    images = np.asarray(
        sample(
            model,
            jax.random.key(seed),
            num,
            steps,
            sampler=sampler,
            guidance=guidance,
            labels=labels,
        )
    )
    grid = image_grid(images)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    picture = Image.fromarray(grid)
    if max(picture.size) < 256:
        scale = max(1, 256 // max(picture.size))
        picture = picture.resize(
            (picture.size[0] * scale, picture.size[1] * scale), Image.Resampling.NEAREST
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(output)
    return output
