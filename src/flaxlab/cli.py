"""The ``flaxlab`` command: parses arguments, calls the library, prints results.

Errors from bad input are printed on one line (``error: ...``) with exit status 2; nothing
already written in a work directory is changed by a command that fails its checks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

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


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("flaxlab").setLevel(logging.INFO)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _fail(error: Exception) -> None:
    message = str(error).replace("\n", " ")
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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
    verbose: bool = False,
):
    """Train a preset (resuming from the newest checkpoint in WORKDIR) and evaluate it."""
    _setup_logging(verbose)
    from flaxlab.configs import get_preset
    from flaxlab.train import Estimator, TrainingError

    workdir = workdir or Path("runs") / preset
    try:
        config = get_preset(preset, set_ or [])
        estimator = Estimator(config, workdir, progress=progress)
        final = estimator.train()
    except (ValueError, TrainingError) as error:
        _fail(error)
        return
    if not final:
        typer.echo(f"stopped; checkpoint saved in {workdir}; run the same command to resume")
        return
    _print_metrics(f"final evaluation ({config.train.steps} steps)", final)
    if "accuracy" in final:
        typer.echo(f"test accuracy: {100 * final['accuracy']:.2f}%")
    typer.echo(f"work directory: {workdir} (metrics.jsonl, curves.png, checkpoints/)")


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
    verbose: bool = False,
):
    """Evaluate a checkpoint of WORKDIR, or (--watch) every checkpoint as training writes it."""
    _setup_logging(verbose)
    from flaxlab.train import Estimator, TrainingError, apply_overrides, load_config

    try:
        config = apply_overrides(load_config(workdir), set_ or [])
        estimator = Estimator(config, workdir, progress=False)
        if watch:
            for found, metrics in estimator.watch(poll_seconds=poll, timeout_seconds=timeout):
                _print_metrics(f"step {found}", metrics)
            return
        found, metrics = estimator.evaluate(step)
    except (ValueError, TrainingError) as error:
        _fail(error)
        return
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
    verbose: bool = False,
):
    """Write the model's predictions for a data set to an .npz file."""
    _setup_logging(verbose)
    from flaxlab.train import Estimator, TrainingError, load_config

    try:
        config = load_config(workdir)
        data_config = _data_config_for(config.data, data)
        estimator = Estimator(config, workdir, progress=False)
        path = estimator.predict(data_config, output or workdir / "predictions.npz", step)
    except (ValueError, TrainingError) as error:
        _fail(error)
        return
    typer.echo(f"predictions written to {path}")


def _data_config_for(base, data: str):
    import dataclasses

    if data == "digits":
        return dataclasses.replace(base, name="digits")
    path = Path(data)
    if path.suffix == ".npz":
        return dataclasses.replace(base, name="npz", path=str(path), eval_path=str(path))
    if (path / "test_batch").exists() or (path / "test").is_file():
        return dataclasses.replace(base, name="cifar", path=str(path))
    if path.is_dir():
        return dataclasses.replace(base, name="image_folder", path=str(path), eval_path=str(path))
    raise ValueError(
        f"--data {data!r} is neither 'digits', an .npz file, a CIFAR folder nor an image folder"
    )


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
    verbose: bool = False,
):
    """Sample images from a trained VDM and write them as a PNG grid."""
    _setup_logging(verbose)
    from flaxlab.train import TrainingError

    try:
        model = _restore_model(workdir, "vdm", "sample needs a VDM run", step)
        from flaxlab.train.vdm_task import sample_images

        labels = None if label is None else [label] * num
        path = sample_images(
            model,
            num=num,
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            seed=seed,
            labels=labels,
            output=output or workdir / "samples.png",
        )
    except (ValueError, TrainingError) as error:
        _fail(error)
        return
    typer.echo(f"{num} samples ({sampler}, {steps} steps) written to {path}")


@app.command()
def generate(
    workdir: Annotated[Path, typer.Argument(help="A Performer LM training work directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def ",
    num_tokens: Annotated[int, typer.Option(help="Bytes to generate.")] = 100,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.8,
    seed: int = 0,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
    verbose: bool = False,
):
    """Continue a prompt with a trained Performer LM (O(1) work per generated byte)."""
    _setup_logging(verbose)
    import jax

    from flaxlab.train import TrainingError

    try:
        model = _restore_model(workdir, "performer_lm", "generate needs a performer_lm run", step)
        from flaxlab.models.performer_lm import generate as generate_bytes

        text = generate_bytes(
            model, prompt.encode("utf-8"), num_tokens, jax.random.key(seed), temperature
        )
    except (ValueError, TrainingError) as error:
        _fail(error)
        return
    typer.echo(prompt + text.decode("utf-8", errors="replace"))


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

    try:
        config = get_preset(preset, set_ or [])
    except ValueError as error:
        _fail(error)
        return
    typer.echo(json.dumps(to_dict(config), indent=2))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
