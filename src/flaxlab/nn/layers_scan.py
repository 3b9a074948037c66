"""Memory and compile-time switches for stacks of blocks: per-block remat and scan over layers.

:func:`run_blocks` applies a list of blocks (an ``nnx.List`` of modules, as every flaxlab
transformer-style model holds them) to an activation, in one of three ways:

* **unrolled** (``remat="none"``, ``scan=False``): a Python loop, the blocks called directly.
* **rematerialised** (``remat`` a policy): each block's forward runs under
  :func:`jax.checkpoint`, so the backward pass recomputes its activations instead of keeping
  them. ``"full"`` saves nothing, ``"dots"`` keeps matrix-multiply results
  (:func:`jax.checkpoint_policies.dots_saveable`), ``"dots_no_batch"`` keeps those without
  batch dimensions (:func:`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
* **scanned** (``scan=True``): runs of blocks of the same structure go through one
  :func:`jax.lax.scan`, so XLA compiles one block instead of ``depth``.

Scanning keeps the parameter layout: the blocks stay separate modules (``blocks.0...``,
``blocks.1...``), so checkpoints, pretrained loading and path-based sharding rules are unchanged.
Inside the forward, each block is split into its graph definition and state, the states of a run
are stacked along a new leading axis (``jax.tree.map(jnp.stack, ...)``) and the scan merges one
block per step; gradients flow back through the stack to every block's own parameters. State a
block updates while running (a FAVOR+ redraw counter) is returned per step and written back.

A run is a block pattern repeated at least twice: ``period`` consecutive blocks whose structures
equal those of the next ``period`` (a ViT is one run of period 1; V-MoE with MoE every second
block is one run of period 2, a (dense, MoE) pair per scan step). Blocks outside any run are
applied unrolled (rematerialised when asked). Static attributes that legitimately differ from
block to block (the stochastic-depth rate, which grows with depth) are named in ``varying``:
they are ignored when comparing structures and, where they differ within a run, scanned as
per-step inputs passed to ``call`` as keyword overrides (``call(block, x, rngs, drop_path_rate=
<traced scalar>)``).

Randomness: the caller's ``nnx.Rngs`` is threaded through the scan as part of the carry, so each
block draws exactly the keys it draws unrolled (a block whose scanned drop-path rate is 0 skips
its draw, as the unrolled one does): dropout and stochastic depth give the same masks scanned or
not, and the stream's counts advance to the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# The block call: ``call(block, x, rngs, **overrides) -> (x, extra output or None)``.
BlockCall = Callable[..., tuple[jax.Array, Any]]


def check_remat(remat: str, field: str = "remat") -> str:
    """``remat`` if it names a policy of :data:`REMAT_POLICIES`, else a ``ValueError``."""
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"{field}={remat!r} is not a rematerialisation policy; accepted: {list(REMAT_POLICIES)}"
        )
    return remat


def remat_policy(remat: str) -> Callable[..., bool] | None:
    """The :func:`jax.checkpoint` policy of a ``remat`` name (None for ``"none"``)."""
    policies = jax.checkpoint_policies
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.dots_saveable,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
    }[check_remat(remat)]


def block_signature(block: nnx.Module, ignore: Sequence[str] = ()) -> Any:
    """What must match for two blocks to share one scan step: the graph definition (module
    types, static attributes, variable types), without the static attributes named in
    ``ignore``."""
    graphdef = nnx.graphdef(block)
    attributes = getattr(graphdef, "attributes", None)
    nodes = getattr(graphdef, "nodes", None)
    if not ignore or attributes is None or nodes is None:
        return graphdef
    return tuple(nodes), tuple(a for a in attributes if a[0] not in ignore)


def scan_segments(signatures: Sequence[Any]) -> list[tuple[int, int, int]]:
    """Cuts a stack into ``(start, period, repeats)`` segments, greedily from the bottom.

    At each position the segment covering most blocks is taken: a pattern of ``period`` blocks
    repeated ``repeats >= 2`` times (the shortest period on ties), else a single block
    (``period=1, repeats=1``). Signatures are compared with ``==``.

    Example:
      >>> scan_segments("aaab")          # three a's scanned, then b alone
      [(0, 1, 3), (3, 1, 1)]
      >>> scan_segments("abababab")      # four (a, b) pairs
      [(0, 2, 4)]
    """
    ids: list[int] = []
    distinct: list[Any] = []
    for signature in signatures:
        for i, seen in enumerate(distinct):
            if seen == signature:
                ids.append(i)
                break
        else:
            distinct.append(signature)
            ids.append(len(distinct) - 1)
    segments, start, count = [], 0, len(ids)
    while start < count:
        best = (1, 1)  # (period, repeats)
        for period in range(1, (count - start) // 2 + 1):
            unit = ids[start : start + period]
            repeats = 1
            while ids[start + repeats * period : start + (repeats + 1) * period] == unit:
                repeats += 1
            if repeats >= 2 and period * repeats > best[0] * best[1]:
                best = (period, repeats)
        segments.append((start, *best))
        start += best[0] * best[1]
    return segments


def _block_fn(graphdef, rng_graphdef, call: BlockCall, policy, prevent_cse: bool):
    """One block as a pure function of arrays, rematerialised with ``policy`` if given:
    ``(x, state, rng_state, overrides) -> (x, extra, the block's non-parameter state,
    rng_state)``."""

    def apply(x, state, rng_state, overrides):
        block = nnx.merge(graphdef, state)
        rngs = None if rng_graphdef is None else nnx.merge(rng_graphdef, rng_state)
        x, extra = call(block, x, rngs, **overrides)
        rest = nnx.state(block, nnx.Not(nnx.Param))
        return x, extra, rest, (None if rngs is None else nnx.state(rngs))

    if policy is None:
        return apply
    return jax.checkpoint(apply, policy=policy, prevent_cse=prevent_cse)


def run_blocks(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    call: BlockCall,
    *,
    rngs: nnx.Rngs | None = None,
    remat: str = "none",
    scan: bool = False,
    varying: Sequence[str] = (),
    owner: str = "this model",
) -> tuple[jax.Array, list[Any]]:
    """Applies ``blocks`` in order: ``x = call(block, x, rngs)[0]`` for each.

    Args:
      blocks: the modules, bottom first.
      x: the input activation.
      call: ``call(block, x, rngs, **overrides) -> (x, extra)``; ``extra`` (any pytree of
        arrays, or None) is collected per block. ``overrides`` carries the scanned values of the
        ``varying`` attributes; ``call`` must pass them on to the block.
      rngs: the caller's random streams (threaded through scans; updated in place).
      remat: ``"none"``, ``"full"``, ``"dots"`` or ``"dots_no_batch"`` (per-block
        :func:`jax.checkpoint` policy).
      scan: run repeated block patterns with one :func:`jax.lax.scan` each.
      varying: static block attributes allowed to differ between blocks of one scan.
      owner: the model's name for error messages.

    Returns:
      ``(x, extras)`` with ``extras[i]`` block ``i``'s extra output, as unrolled.

    Raises:
      ValueError: ``scan`` is asked but no block pattern repeats (nothing to scan).
    """
    blocks = list(blocks)
    policy = remat_policy(remat)
    if policy is None and not scan:
        extras = []
        for block in blocks:
            x, extra = call(block, x, rngs)
            extras.append(extra)
        return x, extras
    rng_graphdef, rng_state = (None, None) if rngs is None else nnx.split(rngs)
    if scan:
        segments = scan_segments([block_signature(b, varying) for b in blocks])
        if len(blocks) > 1 and all(repeats == 1 for _, _, repeats in segments):
            raise ValueError(
                f"{owner} cannot scan its layers: no block pattern repeats in its stack of "
                f"{len(blocks)}; set scan_layers=false"
            )
    else:
        segments = [(i, 1, 1) for i in range(len(blocks))]
    extras: list[Any] = [None] * len(blocks)
    for start, period, repeats in segments:
        if repeats == 1:
            block = blocks[start]
            graphdef, state = nnx.split(block)
            fn = _block_fn(graphdef, rng_graphdef, call, policy, prevent_cse=True)
            x, extras[start], rest, rng_state = fn(x, state, rng_state, {})
            nnx.update(block, rest)
            continue
        end = start + period * repeats
        x, rng_state, extras[start:end] = _scan_segment(
            blocks[start:end], period, x, call, (rng_graphdef, rng_state), policy, varying
        )
    if rngs is not None:
        nnx.update(rngs, rng_state)
    return x, extras


def _scan_segment(blocks, period, x, call, rngs_split, policy, varying):
    """Scans ``blocks`` (a pattern of ``period`` blocks, repeated) with one ``jax.lax.scan``
    and writes each block's updated non-parameter state back. Returns ``(x, rng_state,
    [extra per block])``."""
    rng_graphdef, rng_state = rngs_split
    repeats = len(blocks) // period
    fns, stacked, overrides = [], [], []
    for j in range(period):
        members = blocks[j::period]
        graphdef, _ = nnx.split(members[0])
        fns.append(_block_fn(graphdef, rng_graphdef, call, policy, prevent_cse=False))
        states = [nnx.state(block) for block in members]
        stacked.append(jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))
        scanned = {}
        for name in varying:
            values = [getattr(block, name) for block in members]
            if any(value != values[0] for value in values):
                scanned[name] = jnp.asarray(values)
        overrides.append(scanned)

    def step(carry, inputs):
        x, rng_state = carry
        states, step_overrides = inputs
        rests, step_extras = [], []
        for fn, state, over in zip(fns, states, step_overrides):
            x, extra, rest, rng_state = fn(x, state, rng_state, over)
            rests.append(rest)
            step_extras.append(extra)
        return (x, rng_state), (tuple(rests), tuple(step_extras))

    (x, rng_state), (rests, segment_extras) = jax.lax.scan(
        step, (x, rng_state), (tuple(stacked), tuple(overrides)), length=repeats
    )
    extras = []
    for k in range(repeats):
        take = lambda leaf, k=k: leaf[k]
        for j in range(period):
            nnx.update(blocks[k * period + j], jax.tree.map(take, rests[j]))
            extras.append(jax.tree.map(take, segment_extras[j]))
    return x, rng_state, extras
