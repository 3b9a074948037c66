"""``flaxlab plan``: per-device memory without allocating, against XLA's compiled step."""

import os

import pytest
from typer.testing import CliRunner

from flaxlab.cli import app
from flaxlab.configs import get_preset
from flaxlab.train.plan import plan_memory
from tests.train.tiny import TINY

runner = CliRunner()
SMALL = {
    "vit-digits": TINY[:4] + ["train.ema_decay=0.99"],
    "vmoe-digits": ["model.moe.layers=1", "model.num_layers=2", "model.moe.num_experts=2"],
}


@pytest.mark.parametrize("preset", list(SMALL))
def test_plan_agrees_with_the_compiled_train_step(preset):
    plan = plan_memory(get_preset(preset, SMALL[preset]), batch_size=32)
    rows = plan["rows"]
    # The state and the batch, counted from shapes alone, are exactly XLA's arguments.
    state = sum(rows[k] for k in ("parameters", "optimizer slots", "ema", "other state"))
    assert state + rows["batch"] == plan["xla"]["arguments"]
    assert (rows["ema"] > 0) == (preset == "vit-digits")
    assert rows["gradients"] == rows["parameters"] and rows["activations"] > rows["parameters"]
    assert abs(plan["total"] / plan["xla_total"] - 1) < 0.10, plan


def test_plan_command_prints_the_table_and_rejects_bad_input():
    result = runner.invoke(app, ["plan", "vit-digits", "--batch-size", "16", "--set", TINY[0]])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "per device, batch 16, mesh data=1, fsdp=1, model=1, expert=1:"
    assert [line.split()[0] for line in lines[1:4]] == ["parameters", "optimizer", "ema"]
    assert lines[-1].startswith("XLA's compiled train step: ")
    bad = runner.invoke(app, ["plan", "vit-digits", "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size 0 must be >= 1" in bad.output
    env = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS")}
    bad = runner.invoke(app, ["plan", "vit-digits", "--devices", "3"])
    assert bad.exit_code == 2 and "--devices 3: JAX started already with 1 devices" in bad.output
    # The flags are for this process's JAX only: processes started later must not inherit them.
    assert {k: os.environ.get(k) for k in env} == env
