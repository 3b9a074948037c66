"""A model family added from outside flaxlab: one module-like object and a preset, no edit of
train/, cli.py or another family; trained, evaluated and predicted through the CLI's code."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from typer.testing import CliRunner

from flaxlab.cli import app
from flaxlab.configs import register_preset
from flaxlab.models import registry
from flaxlab.optim import OptimizerConfig
from flaxlab.train import DataConfig, ExperimentConfig, TaskBase, TaskConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    hidden: int = 8


class ToyModel(nnx.Module):
    """A two-layer perceptron on the flattened 8x8 digits."""

    def __init__(self, config: ToyConfig, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, config.hidden, rngs=rngs)
        self.fc2 = nnx.Linear(config.hidden, 10, rngs=rngs)

    def __call__(self, images):
        return self.fc2(jax.nn.relu(self.fc1(images.reshape(images.shape[0], -1))))


@dataclasses.dataclass(frozen=True)
class ToyTaskConfig(TaskConfig):
    temperature: float = 1.0


class ToyTask(TaskBase):
    """Cross-entropy; predictions are a confidence score only (no label, no class)."""

    Config = ToyTaskConfig

    def loss(self, model, batch, rngs):
        logits = model(batch["image"]) / self.settings.temperature
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"loss": loss}

    def evaluate(self, model, batch):
        ce = optax.softmax_cross_entropy_with_integer_labels(model(batch["image"]), batch["label"])
        mask = batch["mask"].astype(jnp.float32)
        return {"loss": (ce * mask).sum(), "count": mask.sum()}

    def predict(self, model, batch):
        return {"score": jax.nn.softmax(model(batch["image"])).max(-1)}


TOY = types.SimpleNamespace(Config=ToyConfig, Model=ToyModel, Task=ToyTask)


def toy_digits() -> ExperimentConfig:
    """A two-layer perceptron on the digits (the registry test's own family)."""
    return ExperimentConfig(
        family="toy",
        model=ToyConfig(),
        data=DataConfig(name="digits", batch_size=32, eval_batch_size=360),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
        train=TrainConfig(steps=6, log_every=3, checkpoint_every=3),
    )


def test_a_family_registered_from_outside_trains_through_the_cli(tmp_path):
    registry.register_family("toy", TOY)
    register_preset("toy-digits", toy_digits)
    runner = CliRunner()
    workdir = tmp_path / "toy"
    args = ["train", "toy-digits", "--workdir", str(workdir), "--no-progress"]
    result = runner.invoke(app, args + ["--set", "task.temperature=2.0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("loss: ")  # the default headline
    result = runner.invoke(app, ["eval", str(workdir), "--step", "3"])
    assert result.exit_code == 0 and result.output.startswith("step 3: loss"), result.output
    result = runner.invoke(app, ["predict", str(workdir), "--data", "digits"])
    assert result.exit_code == 0, result.output
    with np.load(workdir / "predictions.npz") as p:  # what the task's predict returns, no more
        assert sorted(p.files) == ["score", "step"] and p["score"].shape == (360,)
        assert int(p["step"]) == 6 and np.all((p["score"] > 0.09) & (p["score"] <= 1.0))
    assert '"temperature": 2.0' in (workdir / "config.json").read_text()


def test_a_family_must_have_config_model_and_task():
    with pytest.raises(ValueError, match="lacks Task"):
        registry.register_family("broken", types.SimpleNamespace(Config=ToyConfig, Model=ToyModel))
    with pytest.raises(ValueError, match=r"unknown model family 'nope'; accepted: \[.*'vit'"):
        registry.family("nope")
    for name in ("vit", "mixer", "vmoe", "vdm", "performer_lm"):
        family = registry.family(name)
        assert issubclass(family.Task.Config, TaskConfig), name
        assert dataclasses.is_dataclass(family.Config), name
