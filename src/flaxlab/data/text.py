r"""Byte-level text from the Python standard library's own source files (for language models).

The corpus is a fixed list of stdlib modules, read as raw bytes (UTF-8 source; every byte is a
token, vocabulary 256) from ``sysconfig.get_paths()["stdlib"]`` (or ``data.path`` when given: a
directory laid out like the stdlib). The split is by file: :data:`TRAIN_FILES` for training,
:data:`VALIDATION_FILES` for evaluation. Files are joined with :data:`SEPARATOR` (byte 0, which
never occurs in Python source) between them.

* Training batches are ``{"tokens": int32 [B, L + 1]}``: ``B`` windows of ``L + 1`` consecutive
  bytes whose starts are uniform over the training text, a pure function of ``(seed, step)``
  (``numpy.random.default_rng([seed, step])``), so a resumed run sees the same data.
* Evaluation covers the validation text once: window ``w`` is bytes ``[w L, w L + L + 1)``, so
  consecutive windows share one boundary byte and every byte after the first is a prediction
  target exactly once. Windows come in fixed-size batches; the last batch is padded with copies
  of window 0 and ``mask`` ``False``.

Example:
  >>> train_batches, eval_iterator = text_batches(DataConfig(name="stdlib_text", seq_len=128))
  >>> train_batches(0)["tokens"].shape
  (128, 129)
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

SEPARATOR = 0

TRAIN_FILES = (
    "os.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "argparse.py",
    "functools.py",
    "collections/__init__.py",
    "dataclasses.py",
    "string.py",
    "shutil.py",
    "pathlib.py",
    "random.py",
    "statistics.py",
    "heapq.py",
    "bisect.py",
    "contextlib.py",
    "enum.py",
    "typing.py",
    "abc.py",
    "copy.py",
    "csv.py",
    "glob.py",
    "fnmatch.py",
    "tempfile.py",
    "logging/__init__.py",
    "operator.py",
    "base64.py",
    "difflib.py",
    "gettext.py",
    "ipaddress.py",
)
VALIDATION_FILES = ("calendar.py", "fractions.py", "textwrap.py", "queue.py")


def stdlib_root(path: str | None = None) -> Path:
    """The directory the files are read from: ``path`` if given, else this Python's stdlib."""
    root = Path(path) if path else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"text source directory {str(root)!r} does not exist")
    return root


@functools.lru_cache(maxsize=8)
def load_text(split: str, path: str | None = None) -> np.ndarray:
    """The ``"train"`` or ``"validation"`` text as a uint8 array (files joined by SEPARATOR).

    Args:
      split: ``"train"`` or ``"validation"``.
      path: directory laid out like the stdlib (``None``: this Python's stdlib).

    Returns:
      A read-only ``uint8`` array of the bytes.
    """
    if split == "train":
        files = TRAIN_FILES
    elif split == "validation":
        files = VALIDATION_FILES
    else:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    root = stdlib_root(path)
    pieces = []
    for name in files:
        file = root / name
        if not file.is_file():
            raise ValueError(f"text corpus file {str(file)!r} ({split} split) does not exist")
        pieces.append(file.read_bytes())
    data = np.frombuffer(bytes([SEPARATOR]).join(pieces), dtype=np.uint8).copy()
    data.flags.writeable = False
    return data


def random_windows(
    text: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> np.ndarray:
    """``[batch_size, seq_len + 1]`` int32 windows with uniform starts, from ``(seed, step)``."""
    span = seq_len + 1
    if len(text) < span:
        raise ValueError(f"text of {len(text)} bytes is shorter than a window of {span} bytes")
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, len(text) - span + 1, size=batch_size)
    return text[starts[:, None] + np.arange(span)].astype(np.int32)


def eval_windows(text: np.ndarray, seq_len: int) -> np.ndarray:
    """All windows ``[w L, w L + L + 1)`` that fit in the text: int32 ``[num_windows, L + 1]``."""
    num_windows = (len(text) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"text of {len(text)} bytes is shorter than a window of {seq_len + 1}")
    starts = np.arange(num_windows) * seq_len
    return text[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def padded_batches(windows: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches ``{"tokens", "mask"}``; the last one padded (``mask`` False)."""
    for begin in range(0, len(windows), batch_size):
        chunk = windows[begin : begin + batch_size]
        real = len(chunk)
        if real < batch_size:
            pad = np.broadcast_to(windows[:1], (batch_size - real, windows.shape[1]))
            chunk = np.concatenate([chunk, pad])
        yield {"tokens": chunk, "mask": np.arange(batch_size) < real}


def text_batches(
    config,
) -> tuple[Callable[[int], dict[str, np.ndarray]], Callable[[], Iterator[dict[str, np.ndarray]]]]:
    """The data-source function: ``(train_batches(step), eval_iterator())`` for a DataConfig.

    Uses ``config.seq_len`` (``L``), ``batch_size``, ``eval_batch_size``, ``seed`` and ``path``
    (``None``: this Python's stdlib).
    """
    seq_len = int(config.seq_len)
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be a positive integer, got {config.seq_len!r}")
    for field in ("batch_size", "eval_batch_size"):
        if int(getattr(config, field)) < 1:
            raise ValueError(f"data.{field} must be >= 1, got {getattr(config, field)!r}")
    path = config.path or None
    train_text = load_text("train", path)
    batch_size = int(config.batch_size)
    seed = int(config.seed)

    def train_batches(step: int) -> dict[str, np.ndarray]:
        return {"tokens": random_windows(train_text, batch_size, seq_len, seed, step)}

    def eval_iterator() -> Iterator[dict[str, np.ndarray]]:
        windows = eval_windows(load_text("validation", path), seq_len)
        return padded_batches(windows, int(config.eval_batch_size))

    return train_batches, eval_iterator
