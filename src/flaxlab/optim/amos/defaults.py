"""Default Amos rules derived from parameter names and shapes, and a table of what they give.

The paper's BERT recipe (arXiv 2210.11693) is: LayerNorm scale ``eta = 1``, biases
``0.5``, embeddings ``sqrt(2 / hidden)``, the MLP output kernel ``sqrt(2 / mlp)``, every other
kernel ``sqrt(1 / hidden)``; slots ``(1, out)`` for kernels, ``(vocab, 1)`` for embeddings,
``()`` otherwise. Every kernel in that recipe has ``eta = sqrt(gain / fan_in)`` -- the entry
scale of a variance-preserving layer -- with ``gain = 2`` where the layer reads a ReLU/GELU
output (which roughly halves the second moment) and 1 elsewhere. The defaults apply that rule to
any rank. By the parameter's last name (``kind`` = the name, or its ``_kernel``/``_bias``/
``_scale`` suffix, as in ``fc1_kernel``) and rank:

* ``scale`` (LayerNorm, GroupNorm, RMSNorm): eta 1.0, slot ``()``.
* ``bias``: eta 0.5, slot ``()``.
* token tables of rank >= 2 (``embedding``, ``posemb``, ``cls``, ... ``TOKEN_TABLE_NAMES``):
  eta ``sqrt(2 / shape[-1])``, slot ``shape[:-1] + (1,)`` -- ``(vocab, 1)`` for an
  embedding table, ``(1, tokens, 1)`` for a ViT position embedding.
* every other array of rank >= 2 (``kernel`` of Dense and Conv, attention projections, ...):
  eta ``sqrt(gain / fan_in)``, slot ``(1, ..., 1, out)``.
* every other scalar or vector: eta 1.0, slot ``()``.

``fan_in`` is the product of all axes but the output (last) one -- ``in`` for a Dense kernel
``(in, out)``, ``kh * kw * in`` for a Conv kernel ``(kh, kw, in, out)``, ``heads * head_dim``
for an attention output ``(heads, head_dim, hidden)``, as ``jax.nn.initializers`` count it --
after the leading stack axis of stacked expert weights: a rank >= 3 array under a path
component containing ``expert`` is ``(experts, ..., out)``; its slots keep the expert axis,
``(experts, 1, ..., 1, out)``. ``gain = 2`` for the kernels of the layers in
``POST_ACTIVATION_LAYERS`` (``fc2`` of flaxlab's MLP, Mixer and expert blocks, ``dense2`` of
jestimator's BERT, ``wo`` of T5) and of ``Dense_1`` under a module named ``*mlp*`` (Linen
reference models). On a BERT tree with jestimator's names these rules give the paper's table
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from flaxlab.optim.amos.rules import params_fn_from_assign_map
from flaxlab.optim.amos.transform import (
    ParamsFn,
    Shape,
    amos,
    leaf_names,
    slot_dtype,
    validated_eta,
    validated_slot_shape,
)

TOKEN_TABLE_NAMES = frozenset(
    {
        "embedding",
        "embeddings",
        "posemb",
        "pos_embedding",
        "pos_embeddings",
        "position_embedding",
        "position_embeddings",
        "cls",
        "cls_token",
        "class_token",
    }
)
POST_ACTIVATION_LAYERS = frozenset({"fc2", "dense2", "wo"})


def _kind(name: tuple[str, ...]) -> str:
    """``kernel``/``bias``/``scale`` for those names or ``*_kernel`` etc., else the name."""
    leaf = name[-1] if name else ""
    for kind in ("kernel", "bias", "scale"):
        if leaf == kind or leaf.endswith("_" + kind):
            return kind
    return leaf


def _layer(name: tuple[str, ...]) -> str:
    """The layer a parameter belongs to: ``fc2`` for ``.../fc2/kernel`` and ``.../fc2_kernel``."""
    leaf = name[-1] if name else ""
    if "_" in leaf and leaf.rsplit("_", 1)[1] in ("kernel", "bias", "scale"):
        return leaf.rsplit("_", 1)[0]
    return name[-2] if len(name) >= 2 else ""


def _stack_axes(name: tuple[str, ...], shape: Shape) -> int:
    if len(shape) >= 3 and any("expert" in component.lower() for component in name[:-1]):
        return 1
    return 0


def _is_token_table(name: tuple[str, ...], shape: Shape) -> bool:
    return len(shape) >= 2 and bool(name) and name[-1] in TOKEN_TABLE_NAMES


def _is_post_activation(name: tuple[str, ...]) -> bool:
    layer = _layer(name)
    if layer in POST_ACTIVATION_LAYERS:
        return True
    return layer == "Dense_1" and any("mlp" in component.lower() for component in name[:-2])


def fan_in(name: tuple[str, ...], shape: Shape) -> int:
    """Inputs per output unit of a kernel: the product of all axes but stack axes and the last."""
    return max(1, math.prod(shape[_stack_axes(name, shape) : -1]))


def default_eta_fn(name: tuple[str, ...], shape: Shape) -> float:
    """The expected entry scale of a parameter, by the rules in the module docstring.

    Example:
      >>> default_eta_fn(("encoder", "blocks", "0", "mlp", "fc2", "kernel"), (3072, 768))
      0.02551551815399144
    """
    shape = tuple(shape)
    kind = _kind(name)
    if kind == "scale":
        return 1.0
    if kind == "bias":
        return 0.5
    if _is_token_table(name, shape):
        return math.sqrt(2.0 / shape[-1])
    if len(shape) >= 2:
        gain = 2.0 if _is_post_activation(name) else 1.0
        return math.sqrt(gain / fan_in(name, shape))
    return 1.0


def default_shape_fn(name: tuple[str, ...], shape: Shape) -> Shape:
    """The slot shape of a parameter, by the rules in the module docstring.

    Example:
      >>> default_shape_fn(("embedding", "kernel"), (16, 16, 3, 768))
      (1, 1, 1, 768)
      >>> default_shape_fn(("token_embed", "embedding"), (30522, 768))
      (30522, 1)
    """
    shape = tuple(shape)
    if len(shape) < 2 or _kind(name) in ("scale", "bias"):
        return ()
    if _is_token_table(name, shape):
        return shape[:-1] + (1,)
    stack = _stack_axes(name, shape)
    return shape[:stack] + (1,) * (len(shape) - stack - 1) + shape[-1:]


_USE_DEFAULT = object()


def with_overrides(assign_map: Mapping[str, Any] | None, fallback: ParamsFn) -> ParamsFn:
    """``fallback`` preceded by the rules of ``assign_map`` (regex -> value or SHAPE expression).

    Example:
      >>> eta_fn = with_overrides({".*head/kernel": 0.01}, default_eta_fn)
      >>> eta_fn(("head", "kernel"), (768, 10))
      0.01
    """
    if not assign_map:
        return fallback
    rules = dict(assign_map)
    rules[r"(?s).*"] = _USE_DEFAULT
    matched = params_fn_from_assign_map(rules, eval_str_value=True)

    def params_fn(name, shape):
        value = matched(name, shape)
        return fallback(name, shape) if value is _USE_DEFAULT else value

    return params_fn


def amos_with_defaults(
    learning_rate: float | optax.Schedule,
    *,
    eta_overrides: Mapping[str, Any] | None = None,
    shape_overrides: Mapping[str, Any] | None = None,
    beta: float = 0.999,
    momentum: float | None = 0.9,
    clip_value: float | None = 1.0,
    extra_l2: float = 0.0,
    d_coef: float = 0.25,
    c_coef: float = 0.25,
    epsilon: float = 2.0**-125,
    momentum_dtype=None,
) -> optax.GradientTransformation:
    """:func:`~flaxlab.optim.amos.amos` with the default rules and the paper's BERT settings.

    Args:
      learning_rate: global learning rate ``xi`` or a schedule (called with the 1-based step);
        about ``1 / sqrt(number of independent batches)``.
      eta_overrides, shape_overrides: assign maps ``regex -> value`` (values may be SHAPE
        expressions) tried before :func:`default_eta_fn` / :func:`default_shape_fn`.
      beta, momentum, clip_value, extra_l2, d_coef, c_coef, epsilon, momentum_dtype: as in
        :func:`~flaxlab.optim.amos.amos`; defaults are the paper's BERT-base settings.

    Example:
      >>> tx = amos_with_defaults(0.005, eta_overrides={".*head/kernel": 0.01})
    """
    return amos(
        learning_rate,
        with_overrides(eta_overrides, default_eta_fn),
        shape_fn=with_overrides(shape_overrides, default_shape_fn),
        beta=beta,
        momentum=momentum,
        clip_value=clip_value,
        extra_l2=extra_l2,
        d_coef=d_coef,
        c_coef=c_coef,
        epsilon=epsilon,
        momentum_dtype=momentum_dtype,
    )


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def amos_slot_rows(params, eta_fn: ParamsFn, shape_fn: ParamsFn | None, momentum=None):
    """Per parameter: ``(name, shape, eta, slot_shape, amos_slot_bytes, adamw_slot_bytes)``.

    Slot bytes follow :func:`~flaxlab.optim.amos.amos`: ``v`` and ``b`` in the slot dtype
    (at least float32), plus a full-size momentum in that dtype when ``momentum`` is set;
    AdamW keeps ``mu`` and ``nu`` in the parameter dtype (``optax.adamw`` defaults).
    """
    rows = []
    for name, leaf in zip(leaf_names(params), jax.tree.leaves(params), strict=True):
        shape = tuple(leaf.shape)
        eta = validated_eta(name, shape, eta_fn(name, shape))
        slot_shape = (
            shape if shape_fn is None else validated_slot_shape(name, shape, shape_fn(name, shape))
        )
        slot_item = np.dtype(slot_dtype(leaf.dtype)).itemsize
        amos_bytes = 2 * math.prod(slot_shape) * slot_item
        if momentum:
            amos_bytes += math.prod(shape) * slot_item
        adamw_bytes = 2 * math.prod(shape) * np.dtype(leaf.dtype).itemsize
        rows.append((name, shape, eta, slot_shape, amos_bytes, adamw_bytes))
    return rows


def amos_param_table(params, eta_fn: ParamsFn, shape_fn: ParamsFn | None, momentum=None) -> str:
    """A printable table of path, shape, eta, slot shape and slot bytes per parameter.

    The last lines give the totals and the ratio of Amos's slot bytes to AdamW's (``mu`` and
    ``nu``). ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).

    Example:
      >>> import jax.numpy as jnp
      >>> print(amos_param_table({"dense": {"kernel": jnp.zeros((4, 8))}},
      ...                        default_eta_fn, default_shape_fn))
      parameter     shape   eta  slot shape  slot bytes
      ------------  ------  ---  ----------  ----------
      dense/kernel  (4, 8)  0.5  (1, 8)      64 B
      1 tensors, 32 parameters; Amos slots (no momentum): 64 B; AdamW slots: 256 B; ratio 25.00%
    """
    rows = amos_slot_rows(params, eta_fn, shape_fn, momentum)
    header = ("parameter", "shape", "eta", "slot shape", "slot bytes")
    lines = [
        (
            "/".join(name) or "<root>",
            str(shape),
            f"{eta:.6g}",
            str(slot_shape),
            _format_bytes(amos_bytes),
        )
        for name, shape, eta, slot_shape, amos_bytes, _ in rows
    ]
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=False)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out = [line.rstrip() for line in out]
    amos_total = sum(row[4] for row in rows)
    adamw_total = sum(row[5] for row in rows)
    num_params = sum(math.prod(row[1]) for row in rows)
    ratio = amos_total / adamw_total if adamw_total else float("nan")
    momentum_note = f"momentum {momentum}" if momentum else "no momentum"
    out.append(
        f"{len(rows)} tensors, {num_params:,} parameters; Amos slots ({momentum_note}): "
        f"{_format_bytes(amos_total)}; AdamW slots: {_format_bytes(adamw_total)}; "
        f"ratio {ratio:.2%}"
    )
    return "\n".join(out)
