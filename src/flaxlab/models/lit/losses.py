r"""Contrastive losses of image-text models: CLIP/LiT's softmax loss and SigLIP's sigmoid loss.

Both take L2-normalised embeddings ``zimg`` and ``ztxt`` ``[N, D]`` whose row ``i`` is a pair.
LiT (Zhai et al. 2021, arXiv 2111.07991; big_vision ``trainers/proj/image_text``) trains with

.. math::
    \ell = \frac{1}{N} \sum_i \tfrac12\left(-\log \mathrm{softmax}_j(L_{ij})_{i}
    - \log \mathrm{softmax}_j(L_{ji})_{i}\right), \qquad L = t\, z_{img} z_{txt}^\top,

the mean of the image-to-text and text-to-image cross-entropies of the diagonal, and SigLIP
(Zhai et al. 2023, arXiv 2303.15343) with a binary loss per pair,

.. math::
    \ell = -\frac{1}{N} \sum_{i,j} \log \sigma\big(z_{ij} (t\, z_{img,i} \cdot z_{txt,j} +
    b)\big), \qquad z_{ij} = 1 \text{ if } i = j \text{ else } -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(zimg, ztxt) -> None:
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(
            f"zimg and ztxt must be [N, D] of one shape, got {zimg.shape} and {ztxt.shape}"
        )


def softmax_contrastive_loss(zimg, ztxt, temperature, mask=None) -> jax.Array:
    """The symmetric softmax (InfoNCE) loss; ``mask`` (0/1 per example) leaves examples out of
    both softmaxes and of the mean.

    Args:
      zimg, ztxt: ``[N, D]`` normalised embeddings; pair ``i`` is row ``i`` of both.
      temperature: the logit scale ``t`` (``exp`` of the learned parameter).
      mask: optional ``[N]`` 0/1 (or bool): which examples are real.

    Returns:
      The scalar loss (float32).
    """
    _check(zimg, ztxt)
    logits = (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T) * jnp.asarray(
        temperature, jnp.float32
    ).reshape(())
    n = logits.shape[0]
    valid = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask).astype(bool)
    pair_valid = valid[:, None] & valid[None, :]
    # Finite, so that the masked rows stay finite (and so do gradients through jnp.where).
    logits = jnp.where(pair_valid, logits, -1e30)
    diagonal = jnp.diagonal(logits)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - diagonal
    text_to_image = jax.nn.logsumexp(logits, axis=0) - diagonal
    per_pair = jnp.where(valid, 0.5 * (image_to_text + text_to_image), 0.0)
    return jnp.sum(per_pair) / jnp.maximum(jnp.sum(valid), 1)


def sigmoid_contrastive_loss(zimg, ztxt, temperature, bias) -> jax.Array:
    """SigLIP's loss: ``-sum_ij log_sigmoid(z_ij (t zimg_i . ztxt_j + b)) / N`` with
    ``z_ij = 1`` on the diagonal and ``-1`` elsewhere."""
    _check(zimg, ztxt)
    t = jnp.asarray(temperature, jnp.float32).reshape(())
    b = jnp.asarray(bias, jnp.float32).reshape(())
    logits = zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T * t + b
    signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
