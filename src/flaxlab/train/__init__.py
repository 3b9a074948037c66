"""The estimator (JEstimator's role): train / evaluate / predict any Task."""

from flaxlab.train.checkpoints import Checkpointer, CheckpointError
from flaxlab.train.config import (
    DataConfig,
    ExperimentConfig,
    OptimizerConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from flaxlab.train.estimator import (
    Estimator,
    TrainingError,
    WorkdirMismatchError,
    load_config,
)
from flaxlab.train.task import ClassificationTask, Task, make_task, register_task

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ClassificationTask",
    "DataConfig",
    "Estimator",
    "ExperimentConfig",
    "OptimizerConfig",
    "Task",
    "TrainConfig",
    "TrainingError",
    "WorkdirMismatchError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "make_task",
    "register_task",
    "to_dict",
]
