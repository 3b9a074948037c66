"""The estimator: train, evaluate (once or every checkpoint as it appears) and predict.

It orchestrates the pieces: the family's task (:mod:`flaxlab.train.task`), the pure steps
(:mod:`flaxlab.train.step`), the data, the mesh (:mod:`flaxlab.train.sharding`), checkpoints
(:mod:`flaxlab.train.checkpoints`), the work directory (:mod:`flaxlab.train.workdir`) and the
metric writers. The train step is one ``jax.jit`` function of ``(state, batch)`` with the state
donated; metrics stay on the device until a logging or checkpoint step, the only host syncs. A
batch is a pure function of ``(data seed, step)`` and every draw of the step of
``(seed, step)``, so a run resumed from a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlab.data.factory import make_data
from flaxlab.models.registry import task_class
from flaxlab.optim.factory import make_optimizer, make_schedule, peak_learning_rate
from flaxlab.train import sharding as shd
from flaxlab.train.checkpoints import Checkpointer
from flaxlab.train.config import ExperimentConfig
from flaxlab.train.initialize import load_initial_weights, resolve_config
from flaxlab.train.metrics import MetricsWriter, NullWriter, Progress, plot_curves, read_jsonl
from flaxlab.train.prefetch import Prefetcher
from flaxlab.train.step import (
    make_init_fn,
    make_model_step,
    make_sharpness_grad_fn,
    make_train_step,
    split_model,
)
from flaxlab.train.workdir import TrainingError, Workdir

log = logging.getLogger("flaxlab")

# Checkpoint items that hold the model (parameters, EMA, non-trainable state): all that
# evaluation, prediction and sampling read.
MODEL_ITEMS = ("params", "extra")
ALL_ITEMS = ("params", "opt_state", "extra")
# On several hosts the processes agree every this many steps whether one of them was asked
# to stop (SIGTERM, SIGINT); all then save the same step and stop.
STOP_CHECK_EVERY = 10


def load_config(workdir: str | Path) -> ExperimentConfig:
    """The experiment config saved in a work directory."""
    return Workdir(workdir).load_config()


def make_task(config: ExperimentConfig):
    """The task of ``config.family``, built from the experiment config."""
    return task_class(config.family)(config)


class Estimator:
    """Runs a :class:`~flaxlab.train.config.ExperimentConfig` in a work directory.

    Args:
      config: the experiment.
      workdir: where config, checkpoints, metrics, curves and predictions go.
      progress: show a progress bar (default: when stderr is a terminal).
      num_devices: use the first N devices (default: all devices); ``config.mesh`` lays
        them out.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        workdir: str | Path,
        *,
        progress: bool | None = None,
        num_devices: int | None = None,
    ):
        shd.maybe_initialize_distributed()
        config = resolve_config(config)
        self.config = config
        self.workdir = Path(workdir)
        self.primary = shd.is_primary()
        self.run_dir = Workdir(workdir, primary=self.primary)
        self.progress = progress if self.primary else False
        self.task = make_task(config)
        self.mesh = shd.make_mesh(config.mesh, num_devices)
        model = nnx.eval_shape(lambda: self.task.init_model(nnx.Rngs(config.train.seed)))
        self.graphdef, abstract_params, _ = split_model(model)
        self.abstract_params = abstract_params
        self.schedule = make_schedule(config.optimizer, config.train.steps)
        # Global-norm clipping happens in the train step, reusing the norm it logs.
        tx = make_optimizer(
            dataclasses.replace(config.optimizer, grad_clip_norm=None),
            config.train.steps,
            decay_mask=self.task.weight_decay_mask(abstract_params),
        )
        self.tx = self.task.wrap_optimizer(tx)
        self.shardings = shd.state_shardings(self.abstract_state(), self.mesh)
        self.train_step = None  # the jitted step, built by train() (assignable, e.g. in tests)
        self._model_steps: dict[str, Any] = {}
        self._stop_signal: int | None = None
        self._window_start: float | None = None

    # ------------------------------------------------------------------ state

    def _init_fn(self):
        cfg = self.config.train
        return make_init_fn(self.task, self.tx, cfg.seed, ema=cfg.ema_decay > 0)

    def init_state(self) -> dict[str, Any]:
        """Fresh parameters, optimizer state, EMA and step, replicated on the mesh."""
        return jax.jit(self._init_fn(), out_shardings=self.shardings)()

    def initial_state(self) -> dict[str, Any]:
        """The state a fresh run starts from: :meth:`init_state` with the weights of
        ``init.checkpoint`` and ``train.warm_start`` when set."""
        state = self.init_state()
        model = nnx.merge(self.graphdef, state["params"], state["rest"])
        if self.config.init.checkpoint:
            load_initial_weights(model, self.config.init.checkpoint, self._restore_run)

        def load(module, path):
            load_initial_weights(module, path, self._restore_run)

        self.task.initialize(model, self.workdir, load)
        _, params, _ = split_model(model)
        params = jax.device_put(params, self.shardings["params"])
        state = dict(state, params=params)
        if "ema" in state:  # its own buffers: the train step donates both
            state["ema"] = jax.tree.map(jnp.copy, params)
        if self.config.train.warm_start:
            state = self.warm_start(state)
        return state

    @staticmethod
    def _restore_run(run: Path) -> nnx.Module:
        """The newest model of another flaxlab run (its own config and checkpoints)."""
        return Estimator(load_config(run), run, progress=False).restore_model()

    def abstract_state(self) -> dict[str, Any]:
        """Shapes and dtypes of the training state, without allocating it."""
        return jax.eval_shape(self._init_fn())

    @staticmethod
    def _items(state) -> dict[str, Any]:
        """The checkpoint items of a state: params, opt_state, extra (rest, step, EMA)."""
        extra = {"rest": state["rest"], "step": state["step"]}
        if "ema" in state:
            extra["ema"] = state["ema"]
        return {"params": state["params"], "opt_state": state["opt_state"], "extra": extra}

    def restore_state(
        self, step: int | None = None, items=ALL_ITEMS, directory: str | Path | None = None
    ):
        """``(step, state)`` of a checkpoint (``None``: the newest readable one) or
        ``(None, None)`` when there is none. ``items`` are the checkpoint items to read;
        ``directory`` a checkpoints folder (default: this run's). A damaged newest checkpoint
        is reported in one line and the previous one used."""
        directory = Path(directory) if directory is not None else self.run_dir.checkpoints
        if not directory.is_dir():
            raise TrainingError(f"{directory} holds no checkpoints")
        checkpointer = Checkpointer(directory, read_only=True)
        try:
            return self._restore(checkpointer, step, items)
        finally:
            checkpointer.close()

    def _restore(self, checkpointer: Checkpointer, step: int | None, items=ALL_ITEMS):
        templates = {k: v for k, v in self._items(self.abstract_state()).items() if k in items}
        templates["meta"] = {}
        sharding = self._items(self.shardings)
        if step is None:
            step, restored = checkpointer.restore_latest(templates, sharding)
            if restored is None:
                return None, None
        else:
            restored = checkpointer.restore_step(step, templates, sharding)
        state = {k: restored[k] for k in ("params", "opt_state") if k in restored}
        state.update(restored.get("extra", {}))
        state["meta"] = restored.get("meta") or {}
        return step, state

    def warm_start(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the parameters (and, with ``train.warm_start_optimizer``, the
        optimizer state) of the newest checkpoint of ``train.warm_start``."""
        cfg = self.config.train
        source = Path(cfg.warm_start or "")
        ckpt_dir = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        if not cfg.warm_start or not ckpt_dir.is_dir():
            raise TrainingError(f"train.warm_start={cfg.warm_start!r}: no such checkpoint folder")
        items = ("params", "opt_state") if cfg.warm_start_optimizer else ("params",)
        step, restored = self.restore_state(None, items, directory=ckpt_dir)
        if restored is None:
            raise TrainingError(f"train.warm_start={cfg.warm_start!r} holds no readable checkpoint")
        restored.pop("meta", None)
        log.info("warm start from %s step %d (%s)", ckpt_dir, step, ", ".join(items))
        state = dict(state, **restored)
        if "ema" in state:
            state["ema"] = jax.tree.map(jnp.copy, restored["params"])
        return state

    # ------------------------------------------------------------------ steps

    def make_train_step(self):
        """The jitted train step (state donated), from the task's current hooks."""
        opt, cfg = self.config.optimizer, self.config.train
        grad_fn = None
        if opt.sharpness != "none":
            peak = peak_learning_rate(opt, cfg.steps)
            grad_fn = make_sharpness_grad_fn(
                self.task,
                self.graphdef,
                kind=opt.sharpness,
                rho_max=opt.rho_max,
                rho_min=opt.rho_max if opt.rho_min is None else opt.rho_min,
                alpha=opt.alpha,
                adaptive=opt.adaptive,
                schedule=self.schedule,
                lr_max=peak,
                lr_min=peak * opt.end_learning_rate_factor,
                mesh=self.mesh,
                scope=opt.sharpness_scope,
            )
        step = make_train_step(
            self.task,
            self.tx,
            self.graphdef,
            seed=cfg.seed,
            schedule=self.schedule,
            grad_accum_steps=opt.grad_accum_steps,
            grad_clip_norm=opt.grad_clip_norm,
            clip_mask=self.task.gradient_clip_mask(self.abstract_params),
            ema_decay=cfg.ema_decay,
            grad_fn=grad_fn,
        )
        return jax.jit(
            step,
            donate_argnums=0,
            in_shardings=(self.shardings, shd.batch_sharding(self.mesh)),
            out_shardings=(self.shardings, shd.replicated(self.mesh)),
        )

    def _model_step(self, method: str):
        """The jitted ``task.<method>`` (evaluate or predict), built once per estimator."""
        if method not in self._model_steps:
            self._model_steps[method] = jax.jit(make_model_step(self.task, self.graphdef, method))
        return self._model_steps[method]

    @staticmethod
    def _model_params(state):
        return state.get("ema", state["params"])

    def restore_model(self, step: int | None = None) -> nnx.Module:
        """The model of a checkpoint (default: newest readable), with EMA weights if kept."""
        _, state = self._restore_model_state(step)
        return nnx.merge(self.graphdef, self._model_params(state), state["rest"])

    def evaluate_state(self, state, eval_iterator) -> dict[str, float]:
        """The task's summary of the evaluation metrics of ``state``'s model over
        ``eval_iterator()``."""
        eval_step = self._model_step("evaluate")
        params, rest = self._model_params(state), state["rest"]
        sums: dict[str, Any] = {}
        for batch in eval_iterator():
            out = eval_step(params, rest, shd.shard_batch(batch, self.mesh))
            for k, v in out.items():
                sums[k] = sums[k] + v if k in sums else v
        return self.task.summarize({k: float(v) for k, v in jax.device_get(sums).items()})

    # ------------------------------------------------------------------ train

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> dict[str, float]:
        """Trains to ``train.steps`` (resuming from the newest checkpoint) and evaluates.

        Returns the final evaluation metrics ({} when stopped by a signal).
        """
        cfg = self.config.train
        self.run_dir.prepare(self.config)
        shd.sync("flaxlab-prepared")
        if self.primary:
            writer = MetricsWriter(
                self.run_dir.metrics_path,
                self.workdir / "tensorboard" if cfg.tensorboard else None,
            )
        else:
            writer = NullWriter(self.run_dir.metrics_path)
        train_batches, eval_iterator = make_data(self.config.data)
        checkpointer = Checkpointer(self.run_dir.checkpoints, cfg.keep_checkpoints)
        step, state = self._restore(checkpointer, None)
        # A damaged checkpoint newer than the one resumed from would block the re-trained
        # step's save: it is moved aside (kept for inspection) first, by process 0.
        if self.primary:
            checkpointer.set_aside_damaged()
        shd.sync("flaxlab-set-aside")
        checkpointer.manager.reload()
        # Metrics of the steps after the last log record travel with the checkpoint, so the
        # logging windows of a resumed run are those of an uninterrupted one.
        pending: list[tuple[int, dict]] = []
        if state is None:
            state = self.initial_state()
            step = 0
        else:
            assert step is not None
            log.info("resuming from step %d", step)
            pending = [(s, m) for s, m in state.pop("meta").get("pending_metrics", [])]
        writer.truncate_after(step)
        if self.train_step is None:
            self.train_step = self.make_train_step()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            for s in previous:
                signal.signal(s, self._on_signal)
        self.run_dir.write_status("running", step)
        self._window_start = None  # the first window (compilation) reports no throughput
        last_saved = step if step else None
        try:
            prefetcher = Prefetcher(
                lambda i: self._train_batch(train_batches, i), step, cfg.steps, cfg.prefetch
            )
            with Progress(cfg.steps, step, self.progress) as progress, prefetcher:
                while step < cfg.steps:
                    state, metrics = self.train_step(state, prefetcher.get(step))
                    step += 1
                    pending.append((step, metrics))
                    progress.advance(step)
                    stopping = self._stopping(step)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        means = self._write_train_record(pending, writer, last_saved)
                        pending = []
                        progress.log(step, means)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        writer.write(step, "eval", self.evaluate_state(state, eval_iterator))
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                        pending = self._checked(pending, last_saved)
                        self._save(checkpointer, step, state, pending)
                        last_saved = step
                    if stopping:
                        checkpointer.close()
                        self.run_dir.write_status("stopped", step)
                        log.warning(
                            "stopped by %s at step %d; checkpoint saved, "
                            "run the same command again to resume",
                            f"signal {self._stop_signal}"
                            if self._stop_signal
                            else "a signal to another process",
                            step,
                        )
                        return {}
            checkpointer.close()
            final = self.evaluate_state(state, eval_iterator)
            if not any(r["step"] == step and r["split"] == "eval" for r in read_jsonl(writer.path)):
                writer.write(step, "eval", final)
            if self.primary:
                plot_curves(self.run_dir.metrics_path, self.workdir / "curves.png")
            self.run_dir.write_status("done", step, final=final)
            return final
        except BaseException as error:
            try:
                checkpointer.close()
            except Exception:  # keep the original error
                pass
            if not isinstance(error, TrainingError):
                self.run_dir.write_status("failed", step, error=repr(error)[:500])
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _train_batch(self, train_batches, step: int):
        """The batch of ``step`` on the mesh; on several hosts each reads only its rows when
        the source can."""
        if jax.process_count() > 1 and getattr(train_batches, "accepts_rows", False):
            rows = shd.process_rows(self.mesh, self.config.data.batch_size)
            return shd.shard_batch(train_batches(step, rows), self.mesh, local=True)
        return shd.shard_batch(train_batches(step), self.mesh)

    def _stopping(self, step: int) -> bool:
        """Whether to save and stop after ``step``: a signal arrived (on several hosts: at
        any process, agreed every :data:`STOP_CHECK_EVERY` steps, so all stop together)."""
        if jax.process_count() == 1:
            return self._stop_signal is not None
        if step % STOP_CHECK_EVERY:
            return False
        return shd.any_process(self._stop_signal is not None)

    def _checked(self, pending, last_saved) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' metrics on the host; stops on a non-finite loss."""
        host = jax.device_get([m for _, m in pending])
        out = []
        for (step, _), metrics in zip(pending, host):
            metrics = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(metrics["loss"]):
                kept = (
                    f"the last good checkpoint (step {last_saved}) is kept"
                    if last_saved
                    else "no checkpoint had been written yet"
                )
                self.run_dir.write_status(
                    "failed", step, error=f"loss {metrics['loss']} at step {step}"
                )
                raise TrainingError(
                    f"training stopped: the loss is {metrics['loss']} at step {step}; {kept} "
                    f"in {self.run_dir.checkpoints}. Lower optimizer.learning_rate or "
                    "enable optimizer.grad_clip_norm."
                )
            out.append((step, metrics))
        return out

    def _write_train_record(self, pending, writer: MetricsWriter, last_saved) -> dict[str, float]:
        """Writes the mean of the pending steps' metrics as one ``train`` record."""
        host = self._checked(pending, last_saved)
        means = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
        now = time.perf_counter()
        if self._window_start is not None:
            # Wall-clock throughput of the window (the host sync above included).
            means["steps_per_second"] = len(host) / max(now - self._window_start, 1e-9)
        self._window_start = now
        writer.write(host[-1][0], "train", means)
        return means

    def _save(self, checkpointer: Checkpointer, step: int, state, pending) -> None:
        items = self._items(state)
        meta = {
            "step": step,
            "family": self.config.family,
            "pending_metrics": [[s, m] for s, m in pending],
        }
        checkpointer.save(step, items["params"], items["opt_state"], items["extra"], meta)

    # ------------------------------------------------------------------ evaluate / predict

    def _restore_model_state(self, step: int | None):
        """``(step, state)`` of this run's checkpoint with the model items only (evaluation
        does not depend on how the optimizer state is laid out)."""
        if not self.run_dir.checkpoints.is_dir():
            raise TrainingError(f"{self.workdir} has no checkpoints to evaluate")
        found, state = self.restore_state(step, MODEL_ITEMS)
        if state is None or found is None:
            raise TrainingError(f"{self.workdir} holds no readable checkpoint")
        return int(found), state

    def evaluate(self, step: int | None = None) -> tuple[int, dict[str, float]]:
        """Evaluates one checkpoint (default: the newest readable) on the evaluation set."""
        found, state = self._restore_model_state(step)
        _, eval_iterator = make_data(self.config.data)
        metrics = self.evaluate_state(state, eval_iterator)
        MetricsWriter(self.workdir / "eval.jsonl").write(found, "eval", metrics)
        return found, metrics

    def watch(self, *, poll_seconds: float = 5.0, timeout_seconds: float = 3600.0):
        """Evaluates every checkpoint as it appears (the first one included) and keeps the best
        ``train.keep_best`` copies under ``<workdir>/best``. Returns ``[(step, metrics)]`` when
        training is done and every checkpoint has been evaluated, or after
        ``timeout_seconds`` without a new one (:func:`flaxlab.train.watch.watch_checkpoints`).
        """
        from flaxlab.train.watch import watch_checkpoints

        return watch_checkpoints(self, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)

    def predict(self, data_config, output: str | Path, step: int | None = None) -> Path:
        """Writes ``task.predict`` over the evaluation split of ``data_config`` to an ``.npz``
        file (one row per example; the checkpoint's ``step`` too)."""
        found, state = self._restore_model_state(step)
        _, eval_iterator = make_data(data_config)
        predict_step = self._model_step("predict")
        params, rest = self._model_params(state), state["rest"]
        chunks: dict[str, list[np.ndarray]] = {}
        for batch in eval_iterator():
            out = jax.device_get(predict_step(params, rest, shd.shard_batch(batch, self.mesh)))
            mask = np.asarray(batch["mask"])
            for k, v in out.items():
                chunks.setdefault(k, []).append(np.asarray(v)[mask])
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp.npz")
        arrays = {k: np.concatenate(v) for k, v in chunks.items()}
        arrays["step"] = np.asarray(found, np.int64)
        dataset = getattr(eval_iterator, "dataset", None)
        files = dataset().files if dataset is not None else ()
        if files:  # images read from files: which row is which file
            arrays["files"] = np.asarray(files)
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(output)
        return output
