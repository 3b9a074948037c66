"""The work directory of a run: its files, their atomic writes, the run's identity, its status.

A work directory holds ``config.json`` (the experiment, versioned), ``status.json`` (running,
stopped, done or failed, with the step), ``metrics.jsonl``, ``checkpoints/<step>/``,
``curves.png``, ``eval.jsonl`` and, after ``flaxlab eval --watch``, ``best/`` with its index
``best/best.json``. Every JSON file is written to a temporary name and renamed into place, so a
killed process never leaves a torn one. A directory is only ever used for one model: its
*identity* (family and model settings) must match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flaxlab.train.config import ExperimentConfig, from_dict, to_dict


class TrainingError(RuntimeError):
    """A run failed: a non-finite loss, no readable checkpoint, a source that cannot be read."""


class WorkdirError(TrainingError, ValueError):
    """A work directory that cannot be used as given (a usage error); nothing in it changed."""


class WorkdirMismatchError(WorkdirError):
    """The work directory holds a run of another model; nothing in it was changed."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def run_identity(config: ExperimentConfig) -> dict[str, Any]:
    """What makes two runs the same model: the family and the model settings."""
    d = to_dict(config)
    return {"family": d["family"], "model": d["model"]}


def first_difference(a, b, path: str = "") -> str:
    """``"model.hidden_size: 16 there, 32 here"`` for the first differing leaf of two dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path}: {a!r} there, {b!r} here"


class Workdir:
    """The files of one run's directory.

    Args:
      path: the directory (created by :meth:`prepare`).
    """

    def __init__(self, path: str | Path, *, primary: bool = True):
        self.path = Path(path)
        # On several hosts only process 0 writes (the others check and read).
        self.primary = primary

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    def load_config(self) -> ExperimentConfig:
        """The experiment saved here (migrated from an older ``config.json`` version)."""
        if not self.config_path.exists():
            raise WorkdirError(
                f"{str(self.path)!r} is not a flaxlab work directory (no config.json)"
            )
        try:
            data = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as error:
            raise WorkdirError(f"{self.config_path} is not readable JSON ({error})") from None
        return from_dict(data)

    def prepare(self, config: ExperimentConfig) -> None:
        """Creates the directory, or checks that it holds a run of this same model, then
        (re)writes ``config.json``. Raises :class:`WorkdirMismatchError` (nothing changed) for
        another model's run or a non-empty directory that is not a run."""
        if self.config_path.exists():
            try:
                existing = json.loads(self.config_path.read_text())
            except json.JSONDecodeError as error:
                raise WorkdirMismatchError(
                    f"{self.config_path} is not readable JSON ({error}); not touching {self.path}"
                ) from None
            mine = run_identity(config)
            try:  # through the dataclasses: fields added since that run take their defaults
                theirs = run_identity(from_dict(existing))
            except Exception:  # noqa: BLE001 - not a config of this version: compare as stored
                theirs = {k: existing.get(k) for k in mine}
            if mine != theirs:
                raise WorkdirMismatchError(
                    f"{self.path} holds a run of another model "
                    f"({first_difference(theirs, mine)}); nothing was changed. "
                    "Use another --workdir, or delete this one to start over."
                )
        elif self.primary and self.path.exists() and any(self.path.iterdir()):
            raise WorkdirMismatchError(
                f"{self.path} is not empty and holds no flaxlab run; nothing was changed. "
                "Use an empty or new --workdir."
            )
        if self.primary:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.config_path, to_dict(config), indent=2)

    # ------------------------------------------------------------------ status

    def write_status(self, state: str, step: int, **extra) -> None:
        """``status.json``: ``running``, ``stopped``, ``done`` or ``failed`` at ``step``."""
        import time

        if not self.primary:
            return
        record = {"state": state, "step": int(step), "time": time.time(), **extra}
        atomic_write_json(self.path / "status.json", record)

    def read_status(self) -> dict[str, Any]:
        return read_json(self.path / "status.json", {})

    # ------------------------------------------------------------------ best checkpoints

    def best_index(self, metric: str) -> dict[str, Any]:
        """``best/best.json``: the metric, the evaluated steps and the kept best ones."""
        return read_json(
            self.best_dir / "best.json", {"metric": metric, "evaluated": [], "best": []}
        )

    def keep_best(self, step: int, value: float, *, metric: str, mode: str, keep: int) -> None:
        """Records that ``step`` was evaluated (``metric = value``) and keeps a copy of its
        checkpoint under ``best/`` if it is among the best ``keep`` (``mode``: max or min)."""
        self.best_dir.mkdir(exist_ok=True)
        index = self.best_index(metric)
        ranking = [r for r in index["best"] if r["step"] != step]
        ranking.append({"step": step, "value": value})
        ranking.sort(key=lambda r: r["value"], reverse=mode == "max")
        kept, dropped = ranking[:keep], ranking[keep:]
        if any(r["step"] == step for r in kept):
            source = self.checkpoints / str(step)
            if source.is_dir():
                shutil.copytree(source, self.best_dir / str(step), dirs_exist_ok=True)
        for r in dropped:
            shutil.rmtree(self.best_dir / str(r["step"]), ignore_errors=True)
        index.update(evaluated=sorted(set(index["evaluated"]) | {step}), best=kept)
        atomic_write_json(self.best_dir / "best.json", index, indent=1)
