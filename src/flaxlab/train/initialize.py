"""Where a fresh run's weights come from (``init.checkpoint``) and the settings a run resolves
from its data and checkpoint before it starts.

Checkpoint formats, detected: a released ``.npz`` in the official layout (the model's
``pretrained_params`` mapping: ViT, hybrid ViT, Mixer), a T5X checkpoint (the layout
:mod:`flaxlab.train.t5x` reads and writes), a V-MoE partitioned checkpoint (``.index`` +
``.data-*``) and a flaxlab work directory or checkpoints folder.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flax import nnx

from flaxlab.train.config import ExperimentConfig
from flaxlab.train.workdir import TrainingError

log = logging.getLogger("flaxlab")
FORMATS = ("npz", "t5x", "vmoe", "flaxlab")


def checkpoint_format(path: str | Path) -> str:
    """``npz``, ``t5x``, ``vmoe`` or ``flaxlab`` for a checkpoint path; a one-line error
    otherwise."""
    from flaxlab.train.t5x import is_t5x_checkpoint

    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        return "npz"
    if p.suffix == ".index" and p.is_file() or Path(f"{path}.index").is_file():
        return "vmoe"
    if p.exists() and is_t5x_checkpoint(p):
        return "t5x"
    if (p / "config.json").is_file() or (p / "checkpoints").is_dir() or _orbax_steps(p):
        return "flaxlab"
    raise ValueError(
        f"init.checkpoint={str(path)!r}: not a checkpoint flaxlab reads; accepted: an .npz "
        "file (official ViT/Mixer layout), a T5X checkpoint, a V-MoE <prefix>.index, or a "
        "flaxlab work directory"
    )


def _orbax_steps(path: Path) -> bool:
    return path.is_dir() and any(c.name.isdigit() and c.is_dir() for c in path.iterdir())


def resolve_config(config: ExperimentConfig) -> ExperimentConfig:
    """The experiment with what it leaves to the data and the checkpoint filled in: an image
    folder's class names (``data.class_names``) and, with ``init.model_from_checkpoint``, the
    model the checkpoint describes (afterwards explicit, so a resumed or evaluated run does not
    read the checkpoint again). Cheap: a directory listing and the checkpoint's array shapes."""
    from flaxlab.data.factory import class_names
    from flaxlab.models.registry import family

    data, model = config.data, config.model
    if data.name == "image_folder":
        # Folder images take the model's size and channels unless the data say otherwise;
        # a model built from a checkpoint takes the data's size.
        size = data.image_size or getattr(model, "image_size", None)
        channels = data.channels or getattr(model, "num_channels", None)
        names = data.class_names or class_names(data)
        data = dataclasses.replace(data, image_size=size, channels=channels, class_names=names)
        config = dataclasses.replace(config, data=data)
    init = config.init
    if not init.model_from_checkpoint:
        return config
    if not init.checkpoint:
        raise ValueError("init.model_from_checkpoint=true needs init.checkpoint=<path>")
    num_classes = len(data.class_names) if data.class_names else None
    if data.image_size is not None and hasattr(model, "image_size"):
        config = dataclasses.replace(
            config, model=dataclasses.replace(model, image_size=data.image_size)
        )
    if checkpoint_format(init.checkpoint) == "flaxlab":
        model = _model_of_run(Path(init.checkpoint), config, num_classes)
    else:
        build = getattr(family(config.family), "config_from_checkpoint", None)
        if build is None:
            raise ValueError(
                f"model family {config.family!r} cannot build its model from this checkpoint; "
                "set init.model_from_checkpoint=false and the model's fields"
            )
        model = build(init.checkpoint, config.model, num_classes=num_classes)
    log.info("model from %s: %s", init.checkpoint, model)
    return dataclasses.replace(
        config, model=model, init=dataclasses.replace(init, model_from_checkpoint=False)
    )


def _model_of_run(directory: Path, config: ExperimentConfig, num_classes: int | None):
    """A flaxlab run's model config, with this run's image size and class count."""
    from flaxlab.train.workdir import Workdir

    run = directory.parent if directory.name == "checkpoints" else directory
    stored = Workdir(run).load_config()
    if stored.family != config.family:
        raise ValueError(
            f"init.checkpoint={str(directory)!r} holds a {stored.family!r} run; this run "
            f"trains a {config.family!r}"
        )
    fields = {f.name for f in dataclasses.fields(stored.model)}
    changes = {"image_size": getattr(config.model, "image_size", None), "num_classes": num_classes}
    changes = {k: v for k, v in changes.items() if k in fields and v is not None}
    return dataclasses.replace(stored.model, **changes)


def load_initial_weights(model: nnx.Module, path: str | Path, restore_flaxlab=None) -> None:
    """Loads ``path`` (any of :data:`FORMATS`) into ``model`` in place.

    ``restore_flaxlab(run_directory) -> nnx.Module`` rebuilds a flaxlab run's newest model
    (the estimator's restore); its weights are mapped through the official layout when the
    model has one (so a position embedding resizes to another resolution), else assigned.
    """
    from flaxlab.models.pretrained import assign_params, load_pretrained

    kind = checkpoint_format(path)
    if kind == "npz":
        load_pretrained(model, str(path))
    elif kind == "t5x":
        from flaxlab.train.t5x import load_t5x

        assign_params(model, load_t5x(path)["target"])
    elif kind == "vmoe":
        from flaxlab.models.vmoe import VMoE
        from flaxlab.models.vmoe_checkpoints import load_vmoe_checkpoint

        if not isinstance(model, VMoE):
            raise ValueError(
                f"init.checkpoint={str(path)!r} is a V-MoE checkpoint; the model is a "
                f"{type(model).__name__}"
            )
        load_vmoe_checkpoint(model, str(path))
    else:
        if restore_flaxlab is None:
            raise TrainingError("a flaxlab checkpoint needs the estimator to read it")
        run = Path(path)
        source = restore_flaxlab(run.parent if run.name == "checkpoints" else run)
        arrays = getattr(source, "pretrained_arrays", None)
        if arrays is not None and getattr(model, "pretrained_params", None) is not None:
            load_pretrained(model, arrays())
        else:
            assign_params(model, nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    log.info("initial weights from %s (%s)", path, kind)
