"""Checkpoints: orbax-managed, neutral (flat dicts of arrays keyed by dotted path + JSON).

A checkpoint of step N is the folder ``<workdir>/checkpoints/N`` with the items ``params``,
``opt_state``, ``extra`` (non-trainable state, EMA parameters, step) and ``meta`` (JSON). Arrays
are stored by their dotted path (``encoder.blocks.0.attn.query.kernel``), not by Python
structure, so a checkpoint restores onto any mesh and is readable without flaxlab. Orbax writes
each checkpoint to a temporary folder and renames it when complete, so a killed save leaves
no half-written step behind; an unreadable step is reported and skipped in favour of the
previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "extra", "meta")
log = logging.getLogger("flaxlab")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (corrupt, partial, or of another model).

    ``cause`` says why in a few words (for one-line reports).
    """

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause or message


def describe_failure(error: BaseException) -> str:
    """A few words on why orbax/TensorStore could not read a checkpoint (their messages carry
    whole JSON specs)."""
    text = f"{type(error).__name__}: {error}"
    low = text.lower()
    if "not found" in low or "no such file" in low or "does not exist" in low:
        return "files are missing"
    if "checksum" in low or "corrupt" in low or "decod" in low or "invalid" in low:
        return "its data files are corrupt"
    if "shape" in low or "dtype" in low:
        return "its arrays do not fit this model"
    first = text.splitlines()[0]
    cut = first.find("{")
    return (first[:cut] if cut > 0 else first)[:120].strip(" :;,")


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten(tree) -> dict[str, Any]:
    """``{"a.b.0.kernel": leaf, ...}`` for every leaf of a pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        out[".".join(_key_name(p) for p in path) or "_"] = leaf
    if len(out) != len(flat):
        raise ValueError("two leaves of the tree have the same dotted path")
    return out


def unflatten_like(template, flat: dict[str, Any]):
    """Inverse of :func:`flatten`, using ``template`` for the structure."""
    keys = list(flatten(template))
    missing = [k for k in keys if k not in flat]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} arrays this model needs, e.g. {missing[:3]}"
        )
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def abstract_flat(tree, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape/dtype and target sharding of each flattened leaf, to restore into: ``sharding``
    is one sharding for every leaf, or a tree of them like ``tree`` (a checkpoint restores onto
    any mesh: the arrays are stored whole and resharded as they are read)."""
    flat = flatten(tree)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        shardings = dict.fromkeys(flat, sharding)
    else:
        shardings = flatten(sharding)
    return {
        k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=shardings[k])
        for k, v in flat.items()
    }


class Checkpointer:
    """Saves and restores training state under ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 3, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.read_only = read_only
        self.damaged: list[int] = []  # steps the last restore_latest could not read

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, extra, meta: dict) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(flatten(params)),
            opt_state=ocp.args.StandardSave(flatten(opt_state)),
            extra=ocp.args.StandardSave(flatten(extra)),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_step(self, step: int, templates: dict[str, Any], sharding=None) -> dict[str, Any]:
        """Restores the items named in ``templates`` (``{"params": tree, ...}``) of one step.

        Raises CheckpointError if the step is missing or unreadable.
        """
        if step not in self.steps():
            raise CheckpointError(
                f"no checkpoint of step {step} in {self.directory}; available: {self.steps()}"
            )

        def item_sharding(name):
            return sharding.get(name) if isinstance(sharding, dict) else sharding

        restore: dict[str, Any] = {
            name: ocp.args.StandardRestore(abstract_flat(tree, item_sharding(name)))
            for name, tree in templates.items()
            if name != "meta"
        }
        if "meta" in templates:
            restore["meta"] = ocp.args.JsonRestore()
        try:
            result = self.manager.restore(step, args=ocp.args.Composite(**restore))
        except Exception as error:  # orbax raises many types for damaged files
            cause = describe_failure(error)
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is unreadable ({cause})", cause
            ) from error
        out = {}
        for name, tree in templates.items():
            value = result[name]
            out[name] = value if name == "meta" else unflatten_like(tree, value)
        return out

    def restore_latest(self, templates: dict[str, Any], sharding=None):
        """``(step, items)`` of the newest readable checkpoint, or ``(None, None)`` if none.

        A damaged newest checkpoint is reported in one line (which checkpoint, why in a few
        words, which one is used instead) and the previous one used; the damaged steps are
        listed in ``self.damaged``.
        """
        self.damaged = []
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                items = self.restore_step(step, templates, sharding)
            except CheckpointError as error:
                self.damaged.append(step)
                older = steps[: len(steps) - i - 1]
                instead = f"using step {older[-1]} instead" if older else "no older one to use"
                log.warning(
                    "checkpoint %s is unreadable (%s); %s",
                    self.directory / str(step),
                    error.cause,
                    instead,
                )
                continue
            return step, items
        return None, None

    def set_aside_damaged(self) -> list[Path]:
        """Moves the checkpoints the last :meth:`restore_latest` could not read to
        ``<step>.damaged`` (``<step>.damaged.1``, ... if taken), where they stay for inspection
        and no longer block a new save of that step. Returns the new paths."""
        if self.read_only:
            raise CheckpointError("a read-only Checkpointer moves nothing")
        moved = []
        for step in self.damaged:
            source = self.directory / str(step)
            if not source.exists():
                continue
            target = self.directory / f"{step}.damaged"
            n = 0
            while target.exists():
                n += 1
                target = self.directory / f"{step}.damaged.{n}"
            source.rename(target)
            log.warning("moved the unreadable checkpoint %s aside to %s", source, target.name)
            moved.append(target)
        if moved:
            self.manager.reload()
        self.damaged = []
        return moved
