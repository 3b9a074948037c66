"""The experiment configuration: frozen dataclasses, JSON round trip, ``--set`` overrides.

An :class:`ExperimentConfig` names a model family; ``model`` is that family's config dataclass
and ``task`` its task's settings (``Task.Config``); ``data``, ``optimizer`` and ``train`` are
shared by every family. It is written to ``config.json`` in the work directory (with a
``version``) so that ``flaxlab eval`` and ``flaxlab predict`` rebuild exactly the trained model;
files written by earlier versions are migrated when read (:func:`migrate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from flaxlab.data.config import DataConfig
from flaxlab.data.factory import data_source_names
from flaxlab.models.registry import family as model_family
from flaxlab.models.registry import task_class
from flaxlab.optim.factory import OptimizerConfig
from flaxlab.train.sharding import MeshConfig

CONFIG_VERSION = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
      steps: total training steps.
      seed: parameter initialisation and dropout seed.
      log_every: write training metrics every N steps (the only host sync in the loop).
      eval_every: evaluate every N steps (0: only at the end).
      checkpoint_every: save a checkpoint every N steps (and at the end).
      keep_checkpoints: keep the last K checkpoints.
      ema_decay: keep an exponential moving average of the parameters (0: off); evaluation
        and prediction then use the average.
      warm_start: a work directory or checkpoint directory to initialise from.
      warm_start_optimizer: also take the optimizer state (e.g. Amos slots) from it.
      keep_best: ``flaxlab eval --watch`` keeps the best K checkpoints by the task's
        ``task.best_metric``.
      tensorboard: also write TensorBoard event files (needs the ``tb`` extra).
      prefetch: prepare (read, augment, place on the devices) this many batches ahead in a
        background thread while the devices train (0: in the loop). The batches are the
        same either way: each is a function of (data seed, step).
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    ema_decay: float = 0.0
    warm_start: str | None = None
    warm_start_optimizer: bool = False
    keep_best: int = 1
    tensorboard: bool = False
    prefetch: int = 2

    def __post_init__(self):
        if self.prefetch < 0:
            raise ValueError(f"train.prefetch={self.prefetch} must be >= 0 (0: no prefetch)")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """The weights a fresh run starts from (nothing is read when the run resumes).

    Attributes:
      checkpoint: a released ``.npz`` (ViT / Mixer, official layout), a T5X checkpoint
        (``flaxlab export --format t5x``), a V-MoE checkpoint (``<prefix>.index`` with its
        ``.data-*`` shards) or a flaxlab work directory / checkpoints folder; the format is
        detected. Parameters the checkpoint lacks keep their initialisation; a head whose
        shape differs (another class count) starts from zeros, as the reference fine-tunes.
      model_from_checkpoint: build the model the checkpoint describes (patch size, width,
        depth, heads, ...) instead of ``model``'s, keeping ``model``'s image size, dtype,
        dropout and stochastic depth, and taking the class count from the data's classes
        when they are known (an image folder's sub-folders).
    """

    checkpoint: str | None = None
    model_from_checkpoint: bool = False


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: model family + its model and task settings + data, optimizer, loop.

    ``task`` defaults to the family task's default settings (``Task.Config()``).
    """

    family: str
    model: Any
    task: Any = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    description: str = ""

    def __post_init__(self):
        task_config = task_class(self.family).Config
        if self.task is None:
            object.__setattr__(self, "task", task_config())
        elif not isinstance(self.task, task_config):
            raise ValueError(
                f"the task settings of family {self.family!r} are a {task_config.__name__}, "
                f"got {type(self.task).__name__}"
            )
        validate(self)


def validate(config: ExperimentConfig) -> None:
    """Checks the values that the dataclasses' types cannot."""
    choices = {"data.name": (config.data.name, tuple(data_source_names()))}
    for field, (value, accepted) in choices.items():
        if value not in accepted:
            raise ValueError(f"{field}={value!r} is not supported; accepted: {list(accepted)}")
    positive = {
        "train.steps": config.train.steps,
        "train.log_every": config.train.log_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "data.batch_size": config.data.batch_size,
        "data.eval_batch_size": config.data.eval_batch_size,
        "optimizer.grad_accum_steps": config.optimizer.grad_accum_steps,
    }
    for field, value in positive.items():
        if value < 1:
            raise ValueError(f"{field}={value} must be >= 1")
    if config.data.batch_size % config.optimizer.grad_accum_steps:
        raise ValueError(
            f"data.batch_size={config.data.batch_size} is not divisible by "
            f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}"
        )
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={config.train.ema_decay} must be in [0, 1)")


# ----------------------------------------------------------------------------- JSON round trip


def to_dict(config) -> dict[str, Any]:
    """A dataclass tree as plain JSON-able dicts (tuples become lists); an
    :class:`ExperimentConfig` also gets the format ``version``."""
    out = json.loads(json.dumps(dataclasses.asdict(config)))
    if isinstance(config, ExperimentConfig):
        out["version"] = CONFIG_VERSION
    return out


def _coerce(value, hint):
    """Rebuilds a JSON value as the annotated type (dataclasses, tuples, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0])
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return dataclass_from_dict(hint, value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def dataclass_from_dict(cls, data: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; fields: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k]) for k, v in data.items()})


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`to_dict` for an :class:`ExperimentConfig` (any version: older files
    are migrated first)."""
    data = migrate(data)
    data.pop("version", None)
    family = model_family(data["family"])
    data["model"] = dataclass_from_dict(family.Config, data["model"])
    if data.get("task") is not None:
        data["task"] = dataclass_from_dict(family.Task.Config, data["task"])
    for key, cls in (
        ("data", DataConfig),
        ("optimizer", OptimizerConfig),
        ("train", TrainConfig),
        ("init", InitConfig),
        ("mesh", MeshConfig),
    ):
        if key in data:
            data[key] = dataclass_from_dict(cls, data[key])
    return ExperimentConfig(**data)


# Version 1 (flaxlab 0.1) kept optimizer-specific and task-specific settings flat.
_V1_OPTIMIZER_FIELDS = {
    "b1": ("adamw", "b1"),
    "b2": ("adamw", "b2"),
    "eps": ("adamw", "eps"),
    "momentum": ("sgd", "momentum"),
    "nesterov": ("sgd", "nesterov"),
    "amos_learning_rate": ("amos", "learning_rate"),
    "amos_beta": ("amos", "beta"),
    "amos_momentum": ("amos", "momentum"),
    "amos_clip_value": ("amos", "clip_value"),
    "amos_extra_l2": ("amos", "extra_l2"),
}
_V1_TASK_FIELDS = ("label_smoothing", "best_metric", "best_mode")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` dict of any earlier version in the current layout (a new dict).

    Version 1: ``optimizer.b1`` -> ``optimizer.adamw.b1`` (``b2``, ``eps``), ``momentum`` and
    ``nesterov`` -> ``optimizer.sgd.*``, ``amos_<x>`` -> ``optimizer.amos.<x>``;
    ``task: "<name>"`` and ``train.{label_smoothing, best_metric, best_mode}`` -> the family
    task's settings ``task.*`` (a setting that task does not have is dropped if it is the old
    default, refused otherwise).
    """
    data = json.loads(json.dumps(data))
    if data.get("version", 1) >= CONFIG_VERSION:
        return data
    optimizer = data.get("optimizer", {})
    for old, (group, new) in _V1_OPTIMIZER_FIELDS.items():
        if old in optimizer:
            optimizer.setdefault(group, {})[new] = optimizer.pop(old)
    train = data.get("train", {})
    old_task = {k: train.pop(k) for k in _V1_TASK_FIELDS if k in train}
    fields = {f.name for f in dataclasses.fields(task_class(data["family"]).Config)}
    task = {}
    for key, value in old_task.items():
        if key in fields:
            task[key] = value
        elif not (key == "label_smoothing" and value == 0.0):
            raise ValueError(
                f"config.json of version 1 sets train.{key}={value!r}, which the task of "
                f"family {data['family']!r} does not have"
            )
    data["task"] = task
    data["version"] = CONFIG_VERSION
    return data


# ----------------------------------------------------------------------------- --set overrides

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# Optional fields for which "none" is a value (AugReg's setting "none": Inception crop and flip
# only); only "null" unsets them.
NONE_IS_A_VALUE = ("data.augreg",)


def parse_value(text: str, hint, field: str):
    """Parses ``text`` as the annotated type, naming the field and type on failure."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        unset = ("null",) if field in NONE_IS_A_VALUE else ("none", "null")
        if text.strip().lower() in unset and len(args) < len(typing.get_args(hint)):
            return None
        errors = []
        for arg in args:
            try:
                return parse_value(text, arg, field)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if hint is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{field}={text!r}: expected a bool (true/false)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{field}={text!r}: expected an int") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{field}={text!r}: expected a float") from None
    if hint is str:
        return text
    if origin is tuple:
        items = [t for t in text.strip("()[] ").split(",") if t.strip()]
        args = typing.get_args(hint)
        item_hint = args[0] if args else str
        fixed = bool(args) and args[-1] is not Ellipsis
        if fixed and len(items) == 1 and len(set(args)) == 1:
            items = items * len(args)  # "16" for a pair of ints means (16, 16)
        if fixed and len(args) != len(items):
            raise ValueError(f"{field}={text!r}: expected {len(args)} comma-separated values")
        return tuple(parse_value(t.strip(), item_hint, field) for t in items)
    if hint is Any:
        return text
    raise ValueError(f"{field}: cannot set a field of type {hint} from the command line")


def apply_override(config, path: str, text: str, prefix: str = ""):
    """Returns a copy of a dataclass tree with the dotted field ``path`` set from ``text``."""
    head, _, rest = path.partition(".")
    fields = sorted(f.name for f in dataclasses.fields(config))
    if head not in fields:
        near = difflib.get_close_matches(head, fields, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(prefix + n for n in near)}? " if near else ""
        raise ValueError(
            f"unknown field {prefix + head!r}; {hint}valid fields here: "
            f"{', '.join(prefix + v for v in fields)}"
        )
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{prefix + head!r} is a value, not a group of fields")
        value = apply_override(current, rest, text, prefix + head + ".")
    else:
        if dataclasses.is_dataclass(current):
            raise ValueError(f"{prefix + head!r} is a group of fields; set one of its fields")
        hint = typing.get_type_hints(type(config))[head]
        value = parse_value(text, hint, prefix + head)
    return dataclasses.replace(config, **{head: value})


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Applies ``["train.steps=100", "model.hidden_size=64", ...]`` in order."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like field.path=value")
        path, text = (part.strip() for part in item.split("=", 1))
        if path in MOVED_FIELDS:
            raise ValueError(
                f"{path!r} is now {MOVED_FIELDS[path]!r}: --set {MOVED_FIELDS[path]}=..."
            )
        config = apply_override(config, path, text)
    return config


# Version-1 field paths that moved, for a helpful error on an old --set.
MOVED_FIELDS = {
    **{
        f"optimizer.{old}": f"optimizer.{group}.{new}"
        for old, (group, new) in _V1_OPTIMIZER_FIELDS.items()
    },
    **{f"train.{name}": f"task.{name}" for name in _V1_TASK_FIELDS},
}
