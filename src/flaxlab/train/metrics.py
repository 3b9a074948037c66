"""Metric writers (JSONL, optional TensorBoard), the progress display and the curves PNG."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends ``{"step": N, "split": "train"|"eval", ...}`` records to ``metrics.jsonl``.

    On resume, :meth:`truncate_after` drops the records a killed run wrote past its last
    checkpoint, so a resumed run's file equals an uninterrupted run's.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.tensorboard = TensorBoardWriter(tensorboard_dir) if tensorboard_dir else None

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), "split": split}
        record.update({k: _to_json(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self.tensorboard.write(step, split, metrics)


class NullWriter(MetricsWriter):
    """Writes nothing: the metrics writer of every process but the first on several hosts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensorboard = None

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        pass


def _to_json(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a killed writer) is ignored."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class TensorBoardWriter:
    """Scalar summaries as TensorBoard event files, through the ``tensorboard`` package alone."""

    def __init__(self, logdir: str | Path):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as error:
            raise ImportError(
                "train.tensorboard=true needs the 'tb' extra: pip install 'flaxlab[tb]'"
            ) from error
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._writer = EventFileWriter(str(logdir))

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        values = [
            self._summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=float(v))
            for k, v in metrics.items()
        ]
        event = self._event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)
        self._writer.flush()


class Progress:
    """A progress bar (step, loss, steps/s, ETA) on a terminal; periodic log lines elsewhere."""

    def __init__(self, total: int, start: int, enabled: bool | None = None):
        self.total, self.start = total, start
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} steps/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total, completed=start, loss="-", rate="-"
            )
        self._t0, self._s0 = time.perf_counter(), start

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        return (step - self._s0) / elapsed if elapsed > 0 else 0.0

    def advance(self, step: int) -> None:
        if self._bar:
            self._bar.update(self._task, completed=step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        rate = self.rate(step)
        loss = metrics.get("loss", float("nan"))
        if self._bar:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.1f}")
        else:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} steps/s  ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )


def plot_curves(metrics_path: str | Path, output: str | Path) -> Path:
    """A PNG of training loss and evaluation metrics against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    eval_keys = sorted({k for r in evals for k in r} - {"step", "split", "count"})
    panels = 1 + len(eval_keys)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [_num(r.get("loss")) for r in train], label="train loss")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    for ax, key in zip(axes[0, 1:], eval_keys):
        ax.plot([r["step"] for r in evals], [_num(r.get(key)) for r in evals], "o-", label=key)
        if key in {k for r in train for k in r}:
            ax.plot(
                [r["step"] for r in train],
                [_num(r.get(key)) for r in train],
                alpha=0.5,
                label=f"train {key}",
            )
        ax.set_xlabel("step")
        ax.set_title(f"eval {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
