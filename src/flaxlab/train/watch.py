"""``flaxlab eval --watch``: evaluate every checkpoint of a run as training writes it and keep
the best copies (by the task's ``best_metric``) under ``<workdir>/best``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from flaxlab.data.factory import make_data
from flaxlab.train.checkpoints import Checkpointer, CheckpointError
from flaxlab.train.metrics import MetricsWriter
from flaxlab.train.workdir import TrainingError

if TYPE_CHECKING:
    from flaxlab.train.estimator import Estimator

log = logging.getLogger("flaxlab")


def watch_checkpoints(
    estimator: Estimator, *, poll_seconds: float, timeout_seconds: float
) -> list[tuple[int, dict[str, float]]]:
    """Evaluates each checkpoint of ``estimator``'s run not evaluated before (the first one
    included; a damaged one is skipped with a warning), writes ``eval.jsonl`` and keeps the
    best ``train.keep_best``. Returns ``[(step, metrics)]`` when training is done (or failed)
    and every checkpoint has been evaluated, or after ``timeout_seconds`` without a new one."""
    from flaxlab.train.estimator import MODEL_ITEMS

    settings, run_dir = estimator.config.task, estimator.run_dir
    done = set(run_dir.best_index(settings.best_metric)["evaluated"])
    _, eval_iterator = make_data(estimator.config.data)
    directory = run_dir.checkpoints
    idle_since = time.monotonic()
    results = []
    while True:
        steps = Checkpointer(directory, read_only=True).steps() if directory.is_dir() else []
        new = [s for s in steps if s not in done]
        for step in new:
            try:
                _, state = estimator.restore_state(step, MODEL_ITEMS)
            except CheckpointError as error:
                log.warning("%s; skipped", error)
                done.add(step)
                continue
            metrics = estimator.evaluate_state(state, eval_iterator)
            MetricsWriter(estimator.workdir / "eval.jsonl").write(step, "eval", metrics)
            if settings.best_metric not in metrics:
                raise TrainingError(
                    f"task.best_metric={settings.best_metric!r} is not an evaluation "
                    f"metric; available: {sorted(metrics)}"
                )
            run_dir.keep_best(
                step,
                metrics[settings.best_metric],
                metric=settings.best_metric,
                mode=settings.best_mode,
                keep=estimator.config.train.keep_best,
            )
            done.add(step)
            results.append((step, metrics))
            idle_since = time.monotonic()
        finished = run_dir.read_status().get("state") in ("done", "failed") and not new
        if finished or time.monotonic() - idle_since > timeout_seconds:
            return results
        time.sleep(poll_seconds)
