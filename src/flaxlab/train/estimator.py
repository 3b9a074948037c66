"""The estimator: train, evaluate (once or every checkpoint as it appears) and predict.

The hot loop is functional: the model is split once into ``graphdef, params, rest`` and the
train step is one ``jax.jit`` function of ``(state, batch)`` with the state donated. Metrics stay
on the device until a logging or checkpoint step, the only host syncs. A batch is a pure
function of ``(data seed, step)`` and dropout keys are ``fold_in(seed, step)``, so a run resumed
from a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.data.factory import make_data
from flaxlab.optim.factory import make_optimizer, make_schedule
from flaxlab.train import sharding as shd
from flaxlab.train.checkpoints import Checkpointer, CheckpointError
from flaxlab.train.config import ExperimentConfig, from_dict, to_dict
from flaxlab.train.metrics import MetricsWriter, Progress, plot_curves, read_jsonl
from flaxlab.train.task import make_task, summarize

log = logging.getLogger("flaxlab")


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a work directory that cannot be used."""


class WorkdirMismatchError(TrainingError):
    """The work directory holds a run of another model; nothing in it was changed."""


def load_config(workdir: str | Path) -> ExperimentConfig:
    """The experiment config saved in a work directory."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise TrainingError(f"{str(workdir)!r} is not a flaxlab work directory (no config.json)")
    return from_dict(json.loads(path.read_text()))


# Checkpoint items that hold the model (parameters, EMA, non-trainable state): all that
# evaluation, prediction and sampling read.
MODEL_ITEMS = ("params", "extra")


def _identity(config: ExperimentConfig) -> dict[str, Any]:
    d = to_dict(config)
    return {"family": d["family"], "task": d["task"], "model": d["model"]}


class Estimator:
    """Runs a :class:`~flaxlab.train.config.ExperimentConfig` in a work directory.

    Args:
      config: the experiment.
      workdir: where config, checkpoints, metrics, curves and predictions go.
      progress: show a progress bar (default: when stderr is a terminal).
      num_devices: use the first N devices (default: all local devices).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        workdir: str | Path,
        *,
        progress: bool | None = None,
        num_devices: int | None = None,
    ):
        self.config = config
        self.workdir = Path(workdir)
        self.progress = progress
        self.task = make_task(config)
        shd.maybe_initialize_distributed()
        self.mesh = shd.make_mesh(num_devices)
        self._stop_signal: int | None = None
        self._window_start: float | None = None
        model = nnx.eval_shape(lambda: self.task.init_model(nnx.Rngs(config.train.seed)))
        self.graphdef, abstract_params, abstract_rest = nnx.split(model, nnx.Param, ...)
        self._abstract = (abstract_params, abstract_rest)
        self.schedule = make_schedule(config.optimizer, config.train.steps)
        # Global-norm clipping happens in the train step, reusing the norm it logs (one pass
        # over the gradients instead of two).
        self.tx = make_optimizer(
            dataclasses.replace(config.optimizer, grad_clip_norm=None),
            config.train.steps,
            abstract_params,
            decay_mask=getattr(self.task, "weight_decay_mask", None),
        )
        if hasattr(self.task, "wrap_optimizer"):  # e.g. per-group learning rates
            self.tx = self.task.wrap_optimizer(self.tx)
        self._train_step = None
        self._model_steps: dict[str, Any] = {}

    # ------------------------------------------------------------------ state

    def _init_fn(self):
        seed, tx, ema = self.config.train.seed, self.tx, self.config.train.ema_decay

        def init():
            model = self.task.init_model(nnx.Rngs(seed))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            state = {
                "params": params,
                "rest": rest,
                "opt_state": tx.init(params),
                "step": jnp.zeros((), jnp.int32),
            }
            if ema:
                state["ema"] = params
            return state

        return init

    def init_state(self) -> dict[str, Any]:
        """Fresh parameters, optimizer state, EMA and step, replicated on the mesh."""
        return jax.jit(self._init_fn(), out_shardings=shd.replicated(self.mesh))()

    def _templates(self, state):
        extra = {"rest": state["rest"], "step": state["step"]}
        if "ema" in state:
            extra["ema"] = state["ema"]
        return {"params": state["params"], "opt_state": state["opt_state"], "extra": extra}

    def _abstract_state(self):
        return jax.eval_shape(self._init_fn())

    def _restore(
        self,
        checkpointer: Checkpointer,
        step: int | None,
        items=("params", "opt_state", "extra"),
    ):
        """``(step, state)`` of a checkpoint (``None``: the newest readable) or ``(None, None)``."""
        abstract = self._abstract_state()
        templates = {k: v for k, v in self._templates(abstract).items() if k in items}
        templates["meta"] = {}
        sharding = shd.replicated(self.mesh)
        if step is None:
            step, restored = checkpointer.restore_latest(templates, sharding)
            if restored is None:
                return None, None
        else:
            restored = checkpointer.restore_step(step, templates, sharding)
        state = {}
        if "params" in restored:
            state["params"] = restored["params"]
        if "opt_state" in restored:
            state["opt_state"] = restored["opt_state"]
        if "extra" in restored:
            state.update(restored["extra"])
        state["meta"] = restored.get("meta") or {}
        return step, state

    # ------------------------------------------------------------------ steps

    def _make_train_step(self):
        task, graphdef, tx = self.task, self.graphdef, self.tx
        accum = self.config.optimizer.grad_accum_steps
        ema_decay = self.config.train.ema_decay
        base_key = jax.random.key(self.config.train.seed)
        schedule = self.schedule
        clip_norm = self.config.optimizer.grad_clip_norm
        # A task may keep some gradients out of the global-norm clipping (VDM: the schedule
        # shape's variance gradient, on another objective and scale than the loss).
        clip_mask = None  # a pytree of bools like the parameters; None clips everything
        if hasattr(task, "gradient_clip_mask"):
            clip_mask = task.gradient_clip_mask(self._abstract[0])
        if clip_mask is None:
            clip_mask = jax.tree.map(lambda _: True, self._abstract[0])

        def loss_fn(model, batch, key):
            rngs = nnx.Rngs(
                key, dropout=jax.random.fold_in(key, 1), sample=jax.random.fold_in(key, 2)
            )
            return task.loss(model, batch, rngs)

        # nnx.value_and_grad (not jax's) so that non-parameter state the model updates while
        # training (e.g. a FAVOR+ redraw counter) is carried out of the differentiated call.
        value_and_grad = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )

        def grad_fn(params, rest, batch, key):
            model = nnx.merge(graphdef, params, rest)
            (loss, metrics), grads = value_and_grad(model, batch, key)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return (loss, (metrics, new_rest)), grads

        def train_step(state, batch):
            params, rest, step = state["params"], state["rest"], state["step"]
            key = jax.random.fold_in(base_key, step)
            if accum == 1:
                (_, (metrics, rest)), grads = grad_fn(params, rest, batch, key)
            else:
                micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

                def body(carry, inputs):
                    # params ride in the carry: NNX builds the model from this trace's values.
                    grads_sum, rest, p = carry
                    index, microbatch = inputs
                    (_, (m, rest)), g = grad_fn(p, rest, microbatch, jax.random.fold_in(key, index))
                    return (jax.tree.map(jnp.add, grads_sum, g), rest, p), m

                zeros = jax.tree.map(jnp.zeros_like, params)
                (grads, rest, _), per_micro = jax.lax.scan(
                    body, (zeros, rest, params), (jnp.arange(accum), micro)
                )
                grads = jax.tree.map(lambda g: g / accum, grads)
                metrics = jax.tree.map(lambda m: m.mean(0), per_micro)
            # Only the masked-in gradients are measured and clipped.
            grad_norm = _global_norm(
                jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), grads, clip_mask)
            )
            if clip_norm is not None:
                scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-30))
                grads = jax.tree.map(
                    lambda g, m: (g * scale).astype(g.dtype) if m else g, grads, clip_mask
                )
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
            new_state = {"params": params, "rest": rest, "opt_state": opt_state, "step": step + 1}
            if "ema" in state:
                # The usual warm-up: early averages are not dominated by the initialisation.
                decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
                new_state["ema"] = jax.tree.map(
                    lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params
                )
            metrics = dict(metrics)
            metrics["grad_norm"] = grad_norm
            metrics["learning_rate"] = schedule(step)
            return new_state, metrics

        return jax.jit(train_step, donate_argnums=0)

    def restore_model(self, step: int | None = None) -> nnx.Module:
        """The model of a checkpoint (default: newest readable), with EMA weights if kept."""
        _, state = self._restore_checkpoint(step)
        return nnx.merge(self.graphdef, self._model_params(state), state["rest"])

    def _model_params(self, state):
        return state.get("ema", state["params"])

    def _model_step(self, method: str):
        """``task.<method>(model, batch)`` as one jitted function of ``(params, rest, batch)``,
        built once per estimator (``method``: ``"evaluate"`` or ``"predict"``)."""
        if method not in self._model_steps:
            fn, graphdef = getattr(self.task, method), self.graphdef
            self._model_steps[method] = jax.jit(
                lambda params, rest, batch: fn(nnx.merge(graphdef, params, rest), batch)
            )
        return self._model_steps[method]

    def _evaluate_state(self, state, eval_iterator) -> dict[str, float]:
        eval_step = self._model_step("evaluate")
        params, rest = self._model_params(state), state["rest"]
        sums: dict[str, Any] = {}
        for batch in eval_iterator():
            out = eval_step(params, rest, shd.shard_batch(batch, self.mesh))
            for k, v in out.items():
                sums[k] = sums[k] + v if k in sums else v
        return summarize(self.task, {k: float(v) for k, v in jax.device_get(sums).items()})

    # ------------------------------------------------------------------ workdir

    def _prepare_workdir(self) -> None:
        """Creates the work directory, or checks that it holds a run of this same model."""
        config_path = self.workdir / "config.json"
        if config_path.exists():
            try:
                existing = json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise WorkdirMismatchError(
                    f"{config_path} is not readable JSON ({error}); not touching {self.workdir}"
                ) from None
            mine = _identity(self.config)
            try:  # through the dataclasses: fields added since that run take their defaults
                theirs = _identity(from_dict(existing))
            except Exception:  # noqa: BLE001 - not a config of this version: compare as stored
                theirs = {k: existing.get(k) for k in mine}
            if mine != theirs:
                diff = _first_difference(theirs, mine)
                raise WorkdirMismatchError(
                    f"{self.workdir} holds a run of another model ({diff}); nothing was changed. "
                    "Use another --workdir, or delete this one to start over."
                )
        elif self.workdir.exists() and any(self.workdir.iterdir()):
            raise WorkdirMismatchError(
                f"{self.workdir} is not empty and holds no flaxlab run; nothing was changed. "
                "Use an empty or new --workdir."
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(to_dict(self.config), indent=2))
        tmp.replace(config_path)

    def _write_status(self, state: str, step: int, **extra) -> None:
        record = {"state": state, "step": int(step), "time": time.time(), **extra}
        tmp = self.workdir / "status.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.workdir / "status.json")

    def _warm_start(self, state):
        cfg = self.config.train
        source = Path(cfg.warm_start)
        ckpt_dir = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        if not ckpt_dir.is_dir():
            raise TrainingError(f"train.warm_start={cfg.warm_start!r}: no such checkpoint folder")
        items = ("params", "opt_state") if cfg.warm_start_optimizer else ("params",)
        checkpointer = Checkpointer(ckpt_dir, read_only=True)
        try:
            step, restored = self._restore(checkpointer, None, items)
        finally:
            checkpointer.close()
        if restored is None:
            raise TrainingError(f"train.warm_start={cfg.warm_start!r} holds no readable checkpoint")
        restored.pop("meta", None)
        log.info("warm start from %s step %d (%s)", ckpt_dir, step, ", ".join(items))
        state = dict(state, **restored)
        if "ema" in state:
            state["ema"] = restored["params"]
        return state

    # ------------------------------------------------------------------ train

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> dict[str, float]:
        """Trains to ``train.steps`` (resuming from the newest checkpoint) and evaluates.

        Returns the final evaluation metrics.
        """
        cfg = self.config.train
        self._prepare_workdir()
        writer = MetricsWriter(
            self.workdir / "metrics.jsonl",
            self.workdir / "tensorboard" if cfg.tensorboard else None,
        )
        train_batches, eval_iterator = make_data(self.config.data)
        checkpointer = Checkpointer(self.workdir / "checkpoints", cfg.keep_checkpoints)
        step, state = self._restore(checkpointer, None)
        # Metrics of the steps after the last log record travel with the checkpoint, so the
        # logging windows of a resumed run are those of an uninterrupted one.
        pending: list[tuple[int, dict]] = []
        if state is None:
            state = self.init_state()
            if cfg.warm_start:
                state = self._warm_start(state)
            step = 0
        else:
            log.info("resuming from step %d", step)
            pending = [(s, m) for s, m in state.pop("meta").get("pending_metrics", [])]
        writer.truncate_after(step)
        if self._train_step is None:
            self._train_step = self._make_train_step()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            for s in previous:
                signal.signal(s, self._on_signal)
        self._write_status("running", step)
        self._window_start = None  # the first window (compilation) reports no throughput
        last_saved = step if step else None
        try:
            with Progress(cfg.steps, step, self.progress) as progress:
                while step < cfg.steps:
                    batch = shd.shard_batch(train_batches(step), self.mesh)
                    state, metrics = self._train_step(state, batch)
                    step += 1
                    pending.append((step, metrics))
                    progress.advance(step)
                    stopping = self._stop_signal is not None
                    at_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        means = self._write_train_record(pending, writer, last_saved)
                        pending = []
                        progress.log(step, means)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        writer.write(step, "eval", self._evaluate_state(state, eval_iterator))
                    if at_checkpoint or stopping:
                        pending = self._checked(pending, last_saved)
                        self._save(checkpointer, step, state, pending)
                        last_saved = step
                    if stopping:
                        checkpointer.close()
                        self._write_status("stopped", step)
                        log.warning(
                            "stopped by signal %d at step %d; checkpoint saved, "
                            "run the same command again to resume",
                            self._stop_signal,
                            step,
                        )
                        return {}
            checkpointer.close()
            final = self._evaluate_state(state, eval_iterator)
            if not _has_eval_at(writer, step):
                writer.write(step, "eval", final)
            plot_curves(self.workdir / "metrics.jsonl", self.workdir / "curves.png")
            self._write_status("done", step, final=final)
            return final
        except BaseException as error:
            try:
                checkpointer.close()
            except Exception:  # keep the original error
                pass
            if not isinstance(error, TrainingError):
                self._write_status("failed", step, error=repr(error)[:500])
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

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
                self._write_status("failed", step, error=f"loss {metrics['loss']} at step {step}")
                raise TrainingError(
                    f"training stopped: the loss is {metrics['loss']} at step {step}; {kept} "
                    f"in {self.workdir / 'checkpoints'}. Lower optimizer.learning_rate or "
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
        t = self._templates(state)
        meta = {
            "step": step,
            "family": self.config.family,
            "task": self.config.task,
            "pending_metrics": [[s, m] for s, m in pending],
        }
        checkpointer.save(step, t["params"], t["opt_state"], t["extra"], meta)

    # ------------------------------------------------------------------ evaluate / predict

    def _restore_checkpoint(self, step: int | None):
        """``(step, state)`` of this work directory's checkpoint (``None``: newest readable)."""
        checkpointer = self._checkpointer()
        try:
            # The model only: evaluation does not depend on how the optimizer state is laid out.
            found, state = self._restore(checkpointer, step, MODEL_ITEMS)
        finally:
            checkpointer.close()
        if state is None:
            raise TrainingError(f"{self.workdir} holds no readable checkpoint")
        return found, state

    def _checkpointer(self) -> Checkpointer:
        directory = self.workdir / "checkpoints"
        if not directory.is_dir():
            raise TrainingError(f"{self.workdir} has no checkpoints to evaluate")
        return Checkpointer(directory, read_only=True)

    def evaluate(self, step: int | None = None) -> tuple[int, dict[str, float]]:
        """Evaluates one checkpoint (default: the newest readable) on the evaluation set."""
        found, state = self._restore_checkpoint(step)
        _, eval_iterator = make_data(self.config.data)
        metrics = self._evaluate_state(state, eval_iterator)
        MetricsWriter(self.workdir / "eval.jsonl").write(found, "eval", metrics)
        return found, metrics

    def watch(self, *, poll_seconds: float = 5.0, timeout_seconds: float = 3600.0):
        """Evaluates every checkpoint as it appears (the first one included) and keeps the best
        ``train.keep_best`` copies under ``<workdir>/best``. Returns when training is done and
        every checkpoint has been evaluated, or after ``timeout_seconds`` without a new one.
        """
        done = set(self._best_index()["evaluated"])
        _, eval_iterator = make_data(self.config.data)
        directory = self.workdir / "checkpoints"
        idle_since = time.monotonic()
        results = []
        while True:
            steps = Checkpointer(directory, read_only=True).steps() if directory.is_dir() else []
            new = [s for s in steps if s not in done]
            for step in new:
                checkpointer = Checkpointer(directory, read_only=True)
                try:
                    _, state = self._restore(checkpointer, step, MODEL_ITEMS)
                except CheckpointError as error:
                    log.warning("%s; skipped", error)
                    done.add(step)
                    continue
                finally:
                    checkpointer.close()
                metrics = self._evaluate_state(state, eval_iterator)
                MetricsWriter(self.workdir / "eval.jsonl").write(step, "eval", metrics)
                self._keep_best(step, metrics)
                done.add(step)
                results.append((step, metrics))
                idle_since = time.monotonic()
            status = _read_status(self.workdir)
            finished = status.get("state") in ("done", "failed") and not new
            if finished or time.monotonic() - idle_since > timeout_seconds:
                return results
            time.sleep(poll_seconds)

    def _best_index(self) -> dict[str, Any]:
        path = self.workdir / "best" / "best.json"
        if path.exists():
            return json.loads(path.read_text())
        return {"metric": self.config.train.best_metric, "evaluated": [], "best": []}

    def _keep_best(self, step: int, metrics: dict[str, float]) -> None:
        """Records that ``step`` was evaluated and keeps a copy if it is among the best K."""
        cfg = self.config.train
        if cfg.best_metric not in metrics:
            raise TrainingError(
                f"train.best_metric={cfg.best_metric!r} is not an evaluation metric; "
                f"available: {sorted(metrics)}"
            )
        best_dir = self.workdir / "best"
        best_dir.mkdir(exist_ok=True)
        index = self._best_index()
        ranking = index["best"] + [{"step": step, "value": metrics[cfg.best_metric]}]
        ranking.sort(key=lambda r: r["value"], reverse=cfg.best_mode == "max")
        keep, drop = ranking[: cfg.keep_best], ranking[cfg.keep_best :]
        if any(r["step"] == step for r in keep):
            source = self.workdir / "checkpoints" / str(step)
            if source.is_dir():
                shutil.copytree(source, best_dir / str(step), dirs_exist_ok=True)
        for r in drop:
            shutil.rmtree(best_dir / str(r["step"]), ignore_errors=True)
        index.update(evaluated=sorted(set(index["evaluated"]) | {step}), best=keep)
        tmp = best_dir / "best.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(best_dir / "best.json")

    def predict(self, data_config, output: str | Path, step: int | None = None) -> Path:
        """Runs the task's predictions over the evaluation split of ``data_config``; writes .npz."""
        found, state = self._restore_checkpoint(step)
        _, eval_iterator = make_data(data_config)
        predict_step = self._model_step("predict")
        params, rest = self._model_params(state), state["rest"]
        chunks: dict[str, list[np.ndarray]] = {}
        for batch in eval_iterator():
            out = jax.device_get(predict_step(params, rest, shd.shard_batch(batch, self.mesh)))
            mask = np.asarray(batch["mask"])
            for k, v in out.items():
                chunks.setdefault(k, []).append(np.asarray(v)[mask])
            chunks.setdefault("label", []).append(np.asarray(batch["label"])[mask])
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp.npz")
        np.savez(tmp, step=np.int64(found), **{k: np.concatenate(v) for k, v in chunks.items()})
        tmp.replace(output)
        return output


def _global_norm(tree):
    norm = getattr(getattr(optax, "tree", None), "norm", None)
    return norm(tree) if norm is not None else optax.global_norm(tree)


def _read_status(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((workdir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _has_eval_at(writer: MetricsWriter, step: int) -> bool:
    return any(r["step"] == step and r["split"] == "eval" for r in read_jsonl(writer.path))


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path}: {a!r} there, {b!r} here"
