"""The estimator (JEstimator's role): train / evaluate / predict any model family's task."""

from flaxlab.train.checkpoints import Checkpointer, CheckpointError
from flaxlab.train.config import (
    DataConfig,
    ExperimentConfig,
    InitConfig,
    OptimizerConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    migrate,
    to_dict,
)
from flaxlab.train.estimator import Estimator, load_config, make_task
from flaxlab.train.step import (
    clip_by_global_norm,
    make_grad_fn,
    make_init_fn,
    make_model_step,
    make_train_step,
)
from flaxlab.train.task import Task, TaskBase, TaskConfig
from flaxlab.train.workdir import TrainingError, Workdir, WorkdirError, WorkdirMismatchError

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DataConfig",
    "Estimator",
    "ExperimentConfig",
    "InitConfig",
    "OptimizerConfig",
    "Task",
    "TaskBase",
    "TaskConfig",
    "TrainConfig",
    "TrainingError",
    "Workdir",
    "WorkdirError",
    "WorkdirMismatchError",
    "apply_overrides",
    "clip_by_global_norm",
    "from_dict",
    "load_config",
    "make_grad_fn",
    "make_init_fn",
    "make_model_step",
    "make_task",
    "make_train_step",
    "migrate",
    "to_dict",
]
