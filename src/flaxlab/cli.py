"""The ``flaxlab`` command: parses arguments, calls the library, prints results.

Every failure is printed on one line (``error: ...``): exit status 2 for a usage error (a bad
preset, ``--set``, path or work directory: a ``ValueError``), 1 for a run that failed (a
non-finite loss, no readable checkpoint: a ``TrainingError`` or ``CheckpointError``). Nothing
already written in a work directory is changed by a command that fails its checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="flaxlab: VDM, Amos, ViT/Mixer, V-MoE and Performer FAVOR+ in JAX + Flax NNX.",
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config field: --set train.steps=500 (repeatable)."
    ),
]


@app.callback()
def main_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what the library does (INFO).")
    ] = False,
):
    """flaxlab: VDM, Amos, ViT/Mixer, V-MoE and Performer FAVOR+ in JAX + Flax NNX."""
    # flaxlab's own records: one plain line each ("warning: ..."), on stderr; libraries' logs
    # stay quiet (flaxlab reports their failures itself) unless -v.
    handler = logging.StreamHandler()
    handler.setFormatter(_LineFormatter())
    flaxlab_log = logging.getLogger("flaxlab")
    flaxlab_log.handlers[:] = [handler]
    flaxlab_log.setLevel(logging.INFO)
    flaxlab_log.propagate = False
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _LineFormatter(logging.Formatter):
    """``message`` for information, ``warning: message`` (``error: ...``) for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


USAGE_ERROR, RUN_FAILED = 2, 1


def _run(fn: Callable[[], Any]) -> Any:
    """Calls ``fn``; a failure becomes one ``error: ...`` line and exit status 2 (usage) or 1."""
    from flaxlab.train import CheckpointError, TrainingError

    try:
        return fn()
    except ValueError as error:  # bad input: preset, --set, path, work directory
        code = USAGE_ERROR
        message = error
    except (TrainingError, CheckpointError) as error:
        code = RUN_FAILED
        message = error
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    raise typer.Exit(code)


def _print_metrics(title: str, metrics: dict) -> None:
    shown = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if k != "count"
    )
    typer.echo(f"{title}: {shown}")


@app.command()
def train(
    preset: Annotated[str, typer.Argument(help="A preset name (see `flaxlab presets`).")],
    workdir: Annotated[
        Path | None, typer.Option(help="Work directory (default: runs/<preset>).")
    ] = None,
    set_: SetOption = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")
    ] = None,
    distributed: Annotated[
        bool,
        typer.Option(
            help="One process of a multi-host run: jax.distributed.initialize (the cluster "
            "is detected, or give the three options below or FLAXLAB_* variables)."
        ),
    ] = False,
    coordinator: Annotated[
        str | None, typer.Option(help="HOST:PORT of process 0 (with --distributed).")
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option(help="Number of processes (with --distributed).")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option(help="This process's index, 0.. (with --distributed).")
    ] = None,
):
    """Train a preset (resuming from the newest checkpoint in WORKDIR) and evaluate it."""
    from flaxlab.configs import get_preset
    from flaxlab.train import Estimator

    workdir = workdir or Path("runs") / preset
    given = [
        n
        for n, v in (
            ("--coordinator", coordinator),
            ("--num-processes", num_processes),
            ("--process-id", process_id),
        )
        if v is not None
    ]
    if given and not distributed:
        typer.echo(f"error: {', '.join(given)} need --distributed", err=True)
        raise typer.Exit(2)

    def run():
        if distributed:
            from flaxlab.train.sharding import initialize_distributed

            initialize_distributed(coordinator, num_processes, process_id)
        config = get_preset(preset, set_ or [])
        estimator = Estimator(config, workdir, progress=progress)
        needs = estimator.task.prerequisites(workdir)
        if needs:  # claim the work directory before runs are made inside it
            estimator.run_dir.prepare(estimator.config)
        for name, overrides, path, model in needs:
            typer.echo(f"training {name} in {path} first (this run needs it)")
            needed = dataclasses.replace(get_preset(name, overrides), model=model)
            Estimator(needed, path, progress=progress).train()
        return config, estimator, estimator.train()

    config, estimator, final = _run(run)
    if not estimator.primary:  # process 0 reports
        return
    if not final:
        typer.echo(f"stopped; checkpoint saved in {workdir}; run the same command to resume")
        return
    _print_metrics(f"final evaluation ({config.train.steps} steps)", final)
    typer.echo(f"work directory: {workdir} (metrics.jsonl, curves.png, checkpoints/)")
    typer.echo(estimator.task.headline(final))


@app.command("eval")
def evaluate(
    workdir: Annotated[Path, typer.Argument(help="A training work directory.")],
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
    watch: Annotated[
        bool, typer.Option(help="Evaluate every checkpoint as it appears; keep the best.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="--watch: stop after this many seconds without a new one.")
    ] = 3600.0,
    poll: Annotated[float, typer.Option(help="--watch: seconds between looks.")] = 5.0,
    set_: SetOption = None,
):
    """Evaluate a checkpoint of WORKDIR, or (--watch) every checkpoint as training writes it."""
    from flaxlab.train import Estimator, apply_overrides, load_config

    def run():
        config = apply_overrides(load_config(workdir), set_ or [])
        estimator = Estimator(config, workdir, progress=False)
        if watch:
            return estimator.watch(poll_seconds=poll, timeout_seconds=timeout)
        return [estimator.evaluate(step)]

    for found, metrics in _run(run):
        _print_metrics(f"step {found}", metrics)


@app.command()
def predict(
    workdir: Annotated[Path, typer.Argument(help="A training work directory.")],
    data: Annotated[
        str, typer.Option(help="'digits' (test split), or a .npz file / image folder / CIFAR dir.")
    ],
    output: Annotated[
        Path | None, typer.Option(help="Output .npz (default: WORKDIR/predictions.npz).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
):
    """Write the model's predictions for a data set to an .npz file."""
    from flaxlab.train import Estimator, load_config
    from flaxlab.train.predictions import data_config_for, labels_csv

    def run():
        config = load_config(workdir)
        data_config = data_config_for(config.data, data)
        estimator = Estimator(config, workdir, progress=False)
        path = estimator.predict(data_config, output or workdir / "predictions.npz", step)
        return path, labels_csv(path, config.data.class_names)

    path, table = _run(run)
    typer.echo(f"predictions written to {path}" + (f" and {table}" if table else ""))


def _restore_model(workdir: Path, family: str, needs: str, step: int | None):
    """The model of a run of ``family`` in ``workdir`` (a clear error for another family)."""
    from flaxlab.train import Estimator, load_config

    config = load_config(workdir)
    if config.family != family:
        raise ValueError(f"{workdir} holds a {config.family!r} run; {needs}")
    return Estimator(config, workdir, progress=False).restore_model(step)


@app.command("sample")
def sample_command(
    workdir: Annotated[Path, typer.Argument(help="A VDM training work directory.")],
    num: Annotated[int, typer.Option(help="Number of images.")] = 64,
    steps: Annotated[int, typer.Option(help="Sampler steps (network evaluations).")] = 1000,
    sampler: Annotated[str, typer.Option(help="'ancestral' (reference) or 'ddim'.")] = "ancestral",
    guidance: Annotated[
        float, typer.Option(help="Classifier-free guidance weight (conditional models).")
    ] = 0.0,
    label: Annotated[int | None, typer.Option(help="Class to sample (conditional models).")] = None,
    seed: int = 0,
    output: Annotated[
        Path | None, typer.Option(help="PNG path (default: WORKDIR/samples.png).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
):
    """Sample images from a trained VDM and write them as a PNG grid."""

    def run():
        from flaxlab.models.vdm import sample_images

        model = _restore_model(workdir, "vdm", "sample needs a VDM run", step)
        return sample_images(
            model,
            num=num,
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            seed=seed,
            labels=None if label is None else [label] * num,
            output=output or workdir / "samples.png",
        )

    path = _run(run)
    typer.echo(f"{num} samples ({sampler}, {steps} steps) written to {path}")


@app.command()
def generate(
    workdir: Annotated[Path, typer.Argument(help="A Performer LM training work directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def ",
    num_tokens: Annotated[int, typer.Option(help="Bytes to generate.")] = 100,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.8,
    seed: int = 0,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
):
    """Continue a prompt with a trained Performer LM (O(1) work per generated byte)."""

    def run():
        import jax

        from flaxlab.models.performer_lm import generate as generate_bytes

        model = _restore_model(workdir, "performer_lm", "generate needs a performer_lm run", step)
        return generate_bytes(
            model,  # type: ignore[arg-type]  (checked: a performer_lm run)
            prompt.encode("utf-8"),
            num_tokens,
            jax.random.key(seed),
            temperature,
        )

    text = _run(run)
    typer.echo(prompt + text.decode("utf-8", errors="replace"))


@app.command()
def zeroshot(
    workdir: Annotated[Path, typer.Argument(help="A LiT training work directory.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names to choose from.")],
    image: Annotated[list[Path], typer.Option(help="An image file (repeatable).")],
    top: Annotated[int, typer.Option(help="Labels to print per image.")] = 3,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
):
    """Rank class names for images with a LiT model's zero-shot classifier."""

    def run():
        from flaxlab.data.pipeline import to_float_images
        from flaxlab.data.sources import load_image_file
        from flaxlab.models.lit import zero_shot
        from flaxlab.train import load_config

        names = [c.strip() for c in classes.split(",") if c.strip()]
        if len(names) < 2:
            raise ValueError(f"--classes {classes!r}: give at least two comma-separated names")
        config = load_config(workdir)
        model = _restore_model(workdir, "lit", "zeroshot needs a LiT run", step)
        tower = config.model.image
        size, channels = tower.image_size, tower.num_channels
        pixels = [load_image_file(path, size, channels) for path in image]
        images = to_float_images(np.stack(pixels))
        return zero_shot(model, config, names, images), names  # type: ignore[arg-type]

    import numpy as np

    probabilities, names = _run(run)
    for path, row in zip(image, probabilities, strict=True):
        ranked = np.argsort(-row)[:top]
        shown = ", ".join(f"{names[k]} {100 * row[k]:.1f}%" for k in ranked)
        typer.echo(f"{path}: {shown}")


@app.command()
def explain(
    workdir: Annotated[Path, typer.Argument(help="A ViT, V-MoE or Mixer training work directory.")],
    image: Annotated[Path, typer.Option(help="The image file to explain.")],
    out: Annotated[
        Path | None, typer.Option(help="PNG path (default: WORKDIR/explain_<image stem>.png).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
):
    """Explain a classifier's prediction on one image in a PNG: attention rollout (ViT, V-MoE)
    or token-mixing weights (Mixer)."""

    def run():
        from flaxlab.data.pipeline import to_float_images
        from flaxlab.data.sources import load_image_file
        from flaxlab.models.vit.explain import EXPLAINED_FAMILIES, explain_image
        from flaxlab.train import load_config

        config = load_config(workdir)
        if config.family not in EXPLAINED_FAMILIES:
            raise ValueError(
                f"{workdir} holds a {config.family!r} run, which has no attention or token "
                f"mixing to explain; accepted families: {list(EXPLAINED_FAMILIES)}"
            )
        size, channels = config.model.image_size, config.model.num_channels
        pixels = load_image_file(image, size, channels)
        model = _restore_model(workdir, config.family, "explain needs a classifier run", step)
        output = out or workdir / f"explain_{image.stem}.png"
        return explain_image(
            model, to_float_images(pixels[None]), output, class_names=config.data.class_names
        )

    path, _, probability, name = _run(run)
    typer.echo(f"predicted {name} ({100 * probability:.1f}%)")
    typer.echo(str(path))


@app.command("export")
def export_command(
    workdir: Annotated[Path, typer.Argument(help="A training work directory.")],
    out: Annotated[Path, typer.Argument(help="T5X checkpoint folder, or the .npz file.")],
    format_: Annotated[
        str, typer.Option("--format", help="t5x (any model) or npz (official ViT/Mixer).")
    ] = "t5x",
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
):
    """Export a run's model (EMA weights if kept) as a T5X checkpoint or an official .npz;
    train from it with --set init.checkpoint=OUT."""
    from flaxlab.train.export import export_run

    written = _run(lambda: export_run(workdir, out, format_, step))
    typer.echo(f"wrote {written}")


@app.command("plan")
def plan_command(
    preset: Annotated[str, typer.Argument(help="A preset name (see `flaxlab presets`).")],
    set_: SetOption = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Global batch size (default: the preset's).")
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(help="Plan for N simulated CPU devices (default: this machine's devices)."),
    ] = None,
):
    """Per-device memory of training PRESET (parameters, optimizer slots, activations) under
    its mesh, without allocating it; checked against XLA's compiled train step."""
    import os

    saved = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS")}
    if devices is not None:
        if devices < 1:
            typer.echo(f"error: --devices {devices} must be >= 1", err=True)
            raise typer.Exit(2)
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    from flaxlab.configs import get_preset
    from flaxlab.train.plan import format_plan, plan_memory

    def run():
        import jax

        try:
            count = jax.device_count()
        finally:
            # JAX has read the flags; processes started later must not inherit them.
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if devices is not None and count != devices:
            raise ValueError(f"--devices {devices}: JAX started already with {count} devices")
        return plan_memory(get_preset(preset, set_ or []), batch_size=batch_size)

    typer.echo(format_plan(_run(run)))


@app.command()
def presets():
    """List the presets with a one-line description each."""
    from flaxlab.configs import describe_presets

    for name, line in describe_presets().items():
        typer.echo(f"{name:24s} {line}")


@app.command("show-config")
def show_config(
    preset: Annotated[str, typer.Argument(help="A preset name.")],
    set_: SetOption = None,
):
    """Print a preset's full configuration (after --set overrides) as JSON."""
    from flaxlab.configs import get_preset
    from flaxlab.train import to_dict

    config = _run(lambda: get_preset(preset, set_ or []))
    typer.echo(json.dumps(to_dict(config), indent=2))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
