"""T5X checkpoints (the layout of google-research/t5x ``Checkpointer``), with TensorStore + msgpack.

Layout of one checkpoint, as T5X writes it::

    <directory>/checkpoint_<step>/
        checkpoint        msgpack: {"version": 3, "optimizer": {"state": ..., "target": ...}}
        target.encoder.layers_0.mlp.wi.kernel/     one gzip zarr array per tensorstore leaf
        state.param_states.encoder.layers_0.mlp.wi.kernel.v/
        ...

* The msgpack tree is T5X's optimizer state dict: ``target`` (the parameters) and ``state``
  (``step`` and ``param_states``), keys sorted. Lists/tuples are stored as dicts keyed
  ``"0"``, ``"1"``, ... (flax's state-dict convention) and come back as such dicts.
* A leaf written to TensorStore is replaced in the msgpack tree by its TensorStore spec (as
  ``ts.Spec.to_json()``): driver ``zarr``, the dtype, a ``file`` kvstore whose path is the
  array's directory *relative* to the checkpoint directory, and metadata with the shape, the
  chunk shape and the ``gzip`` compressor. The directory name is the leaf's ``/``-joined key
  path with ``/`` replaced by ``.``.
* T5X decides tensorstore vs. inline per leaf by its partitioning (mesh axes ``None`` =
  inline), not by size: every ``target`` parameter is written to TensorStore (scalars
  included), while ``state.step``, optimizer counters and factored statistics (Adafactor
  ``v_row``/``v_col``, the ``(1,)`` placeholders) have no axes and are stored inline in the
  msgpack (flax's msgpack ndarray extension). :func:`default_in_msgpack` reproduces that
  choice from the parameter shapes; pass ``in_msgpack=`` to decide otherwise.
* A save writes everything (arrays, then the msgpack file) into
  ``checkpoint_<step>.tmp-<unix seconds>`` and renames it to ``checkpoint_<step>``; a
  killed save leaves only the temporary directory, which readers ignore.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import tensorstore as ts

from flaxlab.train.t5x_format import (  # noqa: F401 (this module's interface too)
    _STEP_DIR,
    _TMP_DIR,
    CHECKPOINT_FILE,
    DESIRED_CHUNK_SIZE_BYTES,
    MSGPACK_MAX_CHUNK_BYTES,
    SEP,
    STEP_PREFIX,
    VERSION,
    _children,
    _chunk_inline,
    _complete,
    _sorted_tree,
    _step_dirs,
    array_dir_name,
    choose_chunk_shape,
    decode_msgpack,
    encode_msgpack,
    flatten_t5x,
    is_ts_spec,
    step_dir,
    t5x_steps,
    unflatten_t5x,
)

log = logging.getLogger("flaxlab")

InMsgpack = Callable[[str, np.ndarray], bool]


# --------------------------------------------------------------------------- save


class _Slot:
    """Stands for a TensorStore leaf until its array is read (or written)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str):
        self.name = name
        self.value: Any = None


def _fill_slots(node: Any) -> Any:
    if isinstance(node, _Slot):
        return node.value
    if isinstance(node, dict):
        return {k: _fill_slots(v) for k, v in node.items()}
    return node


def _as_array(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array if it is array-like (numpy, jax), else None."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic):
        return np.asarray(value)
    if hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"):
        return np.asarray(value)
    return None


def _state_dict(node: Any, where: str) -> Any:
    """Plain nested dicts with str keys (lists -> {"0": ...}), leaves unchanged."""
    if is_ts_spec(node):
        raise ValueError(f"{where or 'the tree'} looks like a TensorStore spec, not data")
    children = _children(node)
    if children is None:
        return node
    out: dict[str, Any] = {}
    for key, child in children:
        if SEP in key:
            raise ValueError(f"key {key!r} at {where or 'the top'} contains {SEP!r}")
        if key in out:
            raise ValueError(f"two keys at {where or 'the top'} are both {key!r} as strings")
        out[key] = _state_dict(child, f"{where}{SEP}{key}" if where else key)
    return out


def default_in_msgpack(target: Mapping[str, Any]) -> InMsgpack:
    """T5X's choice of inline (msgpack) vs. TensorStore leaves, from the parameter shapes.

    T5X writes a leaf to TensorStore iff its partitioner gives it mesh axes: every parameter
    (``target/...``) and the optimizer states derived from a parameter's axes (Adafactor
    ``m``/``v``, optax ``mu``/``nu``/``trace``...: a ``state/...`` leaf whose key path contains
    a parameter's key path and which has that parameter's shape). Everything else
    (``state/step``, optimizer counts, Adafactor ``v_row``/``v_col`` and ``(1,)`` placeholders)
    has no axes and is written inline into the msgpack file.
    """
    shapes = {
        tuple(name.split(SEP)): tuple(np.shape(leaf))
        for name, leaf in flatten_t5x(target).items()
        if leaf is not None
    }

    def in_msgpack(name: str, arr: np.ndarray) -> bool:
        path = tuple(name.split(SEP))
        if path[0] == "target":
            return False
        if path[0] != "state":
            return True
        rest, shape = path[1:], tuple(arr.shape)
        for i in range(len(rest)):
            for j in range(i + 1, len(rest) + 1):
                if shapes.get(rest[i:j]) == shape:
                    return False
        return True

    return in_msgpack


def _zarr_spec(name: str, arr: np.ndarray, dtype: np.dtype) -> dict[str, Any]:
    """The relative spec T5X stores for a leaf (``_get_spec`` + metadata), normalized."""
    chunks = choose_chunk_shape(arr.shape, DESIRED_CHUNK_SIZE_BYTES / arr.dtype.itemsize)
    spec = {
        "driver": "zarr",
        "dtype": np.dtype(dtype).name,
        "kvstore": {"driver": "file", "path": array_dir_name(name)},
        "metadata": {
            "compressor": {"id": "gzip"},
            "shape": list(arr.shape),
            "chunks": chunks,
        },
    }
    return ts.Spec(spec).to_json()


def _with_base(spec: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """The spec with its kvstore path made absolute under ``ckpt_dir``."""
    absolute = {**spec, "kvstore": dict(spec["kvstore"])}
    absolute["kvstore"]["path"] = os.path.join(os.fspath(ckpt_dir), spec["kvstore"]["path"])
    return absolute


def save_t5x(
    directory: str | os.PathLike,
    step: int,
    target: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    *,
    in_msgpack: InMsgpack | None = None,
    save_dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``directory/checkpoint_<step>/`` in T5X's layout and returns its path.

    ``target``: nested dict of arrays (the parameters). ``state``: optional nested dict, e.g.
    ``{"step": ..., "param_states": {...}}``; ``state["step"]`` defaults to ``step`` (as an
    int32 scalar array, as T5X stores it). ``in_msgpack(name, array)`` says which arrays go
    inline into the msgpack file (default: :func:`default_in_msgpack`). ``save_dtype`` casts
    the ``target`` arrays on disk like T5X's ``Checkpointer(save_dtype=...)`` (whose default
    is float32); None keeps each dtype, so a load gives back the very bits saved.

    The checkpoint is written to ``checkpoint_<step>.tmp-<seconds>`` and renamed when
    complete. If ``checkpoint_<step>`` exists already, T5X skips the save: so does this
    (with a warning), unless ``overwrite``, which swaps the new checkpoint in by renames.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    directory = Path(directory)
    final_dir = step_dir(directory, step)
    if final_dir.exists() and not overwrite:
        log.warning("T5X checkpoint %s exists already; not saving step %d", final_dir, step)
        return final_dir

    tree: dict[str, Any] = {"target": _state_dict(target, "target")}
    state_tree = _state_dict(dict(state) if state is not None else {}, "state")
    if not isinstance(tree["target"], dict) or not isinstance(state_tree, dict):
        raise ValueError("target and state must be nested dicts")
    if "step" in state_tree:
        given = _as_array(state_tree["step"])
        stored = int(given) if given is not None else state_tree["step"]
        if stored != step:
            raise ValueError(f"state['step'] is {stored} but the checkpoint step is {step}")
        if given is None:
            state_tree["step"] = np.asarray(step, np.int32)
    else:
        state_tree = {"step": np.asarray(step, np.int32), **state_tree}
    tree["state"] = state_tree
    rule = in_msgpack if in_msgpack is not None else default_in_msgpack(tree["target"])
    cast = np.dtype(save_dtype) if save_dtype is not None else None

    # Split the leaves: (name, array, on-disk dtype) for tensorstore, the rest stay inline.
    writes: list[tuple[_Slot, np.ndarray, np.dtype]] = []

    def plan(name: str, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plan(f"{name}{SEP}{k}", v) for k, v in node.items()}
        arr = _as_array(node)
        if arr is None:
            if node is None or isinstance(node, bool | int | float | str | bytes | complex):
                return node  # python values go into the msgpack file as they are
            raise TypeError(f"{name}: cannot store a {type(node).__name__} in a T5X checkpoint")
        arr = np.asarray(arr.astype(arr.dtype.newbyteorder("="), copy=False), order="C")
        disk_dtype = cast if (cast is not None and name.startswith("target" + SEP)) else arr.dtype
        if rule(name, arr):
            inline = arr.astype(disk_dtype, copy=False)
            if isinstance(node, np.generic):
                return inline[()]
            return _chunk_inline(inline)
        slot = _Slot(name)
        writes.append((slot, arr, disk_dtype))
        return slot  # its spec once written

    planned = {key: plan(key, tree[key]) for key in ("target", "state")}
    dirs = [array_dir_name(slot.name) for slot, _, _ in writes]
    if len(set(dirs)) != len(dirs):
        twice = sorted({d for d in dirs if dirs.count(d) > 1})
        raise ValueError(f"two parameters share the TensorStore directory {twice[0]!r}")

    directory.mkdir(parents=True, exist_ok=True)
    tmp_dir = directory / f"{final_dir.name}.tmp-{int(time.time())}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        _write_arrays(tmp_dir, writes)
        optimizer = _sorted_tree(_fill_slots(planned))
        data = encode_msgpack({"version": VERSION, "optimizer": optimizer})
        with open(tmp_dir / CHECKPOINT_FILE, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if final_dir.exists():  # overwrite: move the old one aside, then drop it
            old = directory / f"{final_dir.name}.old-{int(time.time())}"
            os.rename(final_dir, old)
            os.rename(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log.info("saved T5X checkpoint of step %d to %s", step, final_dir)
    return final_dir


def _context() -> ts.Context:
    return ts.Context({"file_io_concurrency": {"limit": 128}})


def _write_arrays(ckpt_dir: Path, writes: list[tuple[_Slot, np.ndarray, np.dtype]]) -> None:
    """Writes each array as a gzip zarr array under ``ckpt_dir``; its slot gets the relative
    spec that goes into the msgpack file."""
    context = _context()
    opened = []
    for slot, arr, disk_dtype in writes:
        spec = _zarr_spec(slot.name, arr, disk_dtype)
        slot.value = spec
        open_spec = _with_base(spec, ckpt_dir)
        if np.dtype(disk_dtype) != arr.dtype:  # T5X's cast on save (save_dtype)
            open_spec = {"driver": "cast", "base": open_spec, "dtype": arr.dtype.name}
        opened.append((ts.open(open_spec, create=True, open=True, context=context), arr))
    pending = [future.result().write(arr) for future, arr in opened]
    for write in pending:
        write.result()


# --------------------------------------------------------------------------- load


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint dir, msgpack file)`` for a step dir, its file, or the parent dir."""
    given = Path(path)
    if not given.exists():
        raise ValueError(f"no T5X checkpoint at {given}: the path does not exist")
    if given.is_file():
        return given.parent, given
    if _TMP_DIR.fullmatch(given.name):
        raise ValueError(f"{given} is the temporary directory of an unfinished T5X save")
    if (given / CHECKPOINT_FILE).is_file():
        return given, given / CHECKPOINT_FILE
    if _STEP_DIR.fullmatch(given.name):
        raise ValueError(f"T5X checkpoint {given} is partial: its msgpack file is missing")
    steps = _step_dirs(given)
    if not steps:
        raise ValueError(
            f"{given} holds no T5X checkpoint (no {CHECKPOINT_FILE!r} file and no "
            f"{STEP_PREFIX}_<step> directories)"
        )
    complete = [s for s in sorted(steps) if _complete(steps[s])]
    if not complete:
        names = ", ".join(steps[s].name for s in sorted(steps))
        raise ValueError(f"no complete T5X checkpoint in {given}: {names} lack the msgpack file")
    return steps[complete[-1]], steps[complete[-1]] / CHECKPOINT_FILE


def _read_contents(file: Path) -> dict[str, Any]:
    """The decoded msgpack file, checked to be a T5X checkpoint of a supported version."""
    data = file.read_bytes()
    if data.startswith(b"model_checkpoint_path"):
        raise ValueError(f"{file} is a TensorFlow checkpoint index, not a T5X checkpoint")
    try:
        contents = decode_msgpack(data)
    except Exception as error:  # msgpack raises several types for foreign bytes
        raise ValueError(
            f"{file} is not a T5X checkpoint (not msgpack: {type(error).__name__})"
        ) from error
    if not isinstance(contents, dict):
        raise ValueError(f"{file} is not a T5X checkpoint (its msgpack is not a map)")
    if "_optimizer" in contents or (file.parent / "_METADATA").exists():
        raise ValueError(f"{file} is an Orbax-format T5X checkpoint, not supported here")
    if "optimizer" not in contents or "version" not in contents:
        raise ValueError(f"{file} is not a T5X checkpoint (no 'version' and 'optimizer' entries)")
    version = contents["version"]
    if not isinstance(version, int) or version < 2:
        raise ValueError(f"{file}: T5X checkpoint version {version!r} is not supported (need >= 2)")
    if not isinstance(contents["optimizer"], dict):
        raise ValueError(f"{file} is not a T5X checkpoint ('optimizer' is not a map)")
    return contents


def _read_spec(spec: Mapping[str, Any], ckpt_dir: Path, where: str) -> tuple[dict, str]:
    """A stored spec made openable (as T5X's ``_read_ts``): local file driver, absolute path,
    no chunks/compressor constraints. Returns it with its relative directory name."""
    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    kvstore = spec.get("kvstore")
    if not isinstance(kvstore, dict):
        raise ValueError(f"{where}: malformed TensorStore spec (kvstore {kvstore!r})")
    driver = kvstore.get("driver")
    if driver not in ("file", "gfile", "gcs"):
        raise ValueError(f"{where}: unsupported TensorStore kvstore driver {driver!r}")
    top_path = spec.pop("path", None)  # tensorstore < 0.1.14 specs keep the path at the top
    relative = kvstore["path"] if "path" in kvstore else top_path
    if not isinstance(relative, str):
        raise ValueError(f"{where}: TensorStore spec without a path")
    spec["kvstore"] = {"driver": "file", "path": os.path.join(os.fspath(ckpt_dir), relative)}
    metadata = dict(spec.get("metadata") or {})
    if spec.get("dtype") == "uint16" or metadata.get("dtype") == "<u2":
        raise ValueError(
            f"{where}: stored as uint16 (bfloat16 of checkpoint version 2), not supported"
        )
    metadata.pop("chunks", None)
    metadata.pop("compressor", None)
    spec["metadata"] = metadata
    return spec, relative.rstrip("/")


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    for marker in (" [tensorstore_spec", "{"):  # tensorstore appends whole JSON specs
        cut = text.find(marker)
        text = text[:cut] if cut > 0 else text
    return text[:200].strip(" :;,")


def load_t5x(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a T5X checkpoint: ``{"step": int, "target": {...}, "state": {...}}``.

    ``path``: a ``checkpoint_<step>`` directory, its ``checkpoint`` msgpack file, or the
    directory holding ``checkpoint_<step>`` directories (then the newest complete one). The
    leaves are numpy arrays (inline ones as stored: arrays, numpy or python scalars). Any
    other top-level entry of T5X's state dict (e.g. ``flax_mutables``) is returned as well.
    Raises ValueError with a one-line message for a missing, partial or invalid checkpoint.
    """
    ckpt_dir, file = _resolve(path)
    contents = _read_contents(file)
    context = _context()
    reads: list[tuple[_Slot, str, Any]] = []  # (slot, directory name, open future)

    def visit(node: Any, name: str) -> Any:
        if is_ts_spec(node):
            spec, relative = _read_spec(node, ckpt_dir, f"{file}: {name}")
            if not Path(spec["kvstore"]["path"]).is_dir():
                raise ValueError(
                    f"T5X checkpoint {ckpt_dir} is partial: array directory {relative!r} is missing"
                )
            slot = _Slot(name)
            reads.append((slot, relative, ts.open(spec, open=True, read=True, context=context)))
            return slot
        if isinstance(node, dict):
            return {k: visit(v, f"{name}{SEP}{k}" if name else k) for k, v in node.items()}
        return node

    tree = visit(contents["optimizer"], "")
    current = "?"
    try:
        pending = []
        for slot, relative, future in reads:
            current = relative
            pending.append((slot, relative, future.result().read()))
        for slot, relative, future in pending:
            current = relative
            slot.value = np.asarray(future.result())
    except Exception as error:  # tensorstore reports many kinds of damage
        raise ValueError(
            f"T5X checkpoint {ckpt_dir}: cannot read array {current!r} ({_one_line(error)})"
        ) from error
    result = _fill_slots(tree)
    target = result.get("target", {})
    state = result.get("state", {})
    if not isinstance(target, dict) or not isinstance(state, dict):
        raise ValueError(f"{file}: 'target' and 'state' of a T5X checkpoint must be maps")
    step = state.get("step")
    if step is None:
        match = _STEP_DIR.fullmatch(ckpt_dir.name)
        if match is None:
            raise ValueError(f"{file}: no state.step and no step in the directory name")
        step_value = int(match.group(1))
    else:
        step_value = int(np.asarray(step))
    out = {"step": step_value, "target": target, "state": state}
    for key, value in result.items():
        if key not in ("target", "state"):
            out[key] = value
    return out


def is_t5x_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` (step dir, msgpack file, or parent dir) resolves to a T5X checkpoint:
    a msgpack map with ``version`` and ``optimizer`` entries (read lazily, arrays unread)."""
    try:
        _, file = _resolve(path)
        with open(file, "rb") as f:
            if f.read(21) == b"model_checkpoint_path":
                return False
            f.seek(0)
            if (file.parent / "_METADATA").exists():
                return False
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
            keys, version = set(), None
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                keys.add(key)
                if key == "version":
                    version = unpacker.unpack()
                else:
                    unpacker.skip()
    except Exception:  # anything unreadable is simply not a T5X checkpoint
        return False
    return keys >= {"version", "optimizer"} and isinstance(version, int) and version >= 2
