"""Real processes: SIGKILL mid-run then restart, SIGTERM, and an uninterrupted twin.

The resumed run must end with exactly the metrics of the uninterrupted one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flaxlab.train.metrics import read_jsonl

SETTINGS = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.mlp_dim=32",
    "data.batch_size=16",
    "data.eval_batch_size=360",
    "optimizer.warmup_steps=5",
    "train.steps=200",
    "train.log_every=15",
    "train.checkpoint_every=20",
    "train.eval_every=100",
    "train.keep_checkpoints=2",
]


def command(workdir: Path) -> list[str]:
    args = [sys.executable, "-m", "flaxlab.cli", "train", "vit-digits", "--workdir", str(workdir)]
    for s in SETTINGS:
        args += ["--set", s]
    return args + ["--no-progress"]


def run_until_checkpoint(workdir: Path, at_least: int, sig: int) -> subprocess.Popen:
    """Starts training, waits for a finished checkpoint >= at_least, sends ``sig``."""
    proc = subprocess.Popen(command(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = workdir / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = (
            [
                int(p.name)
                for p in ckpt.glob("*")
                if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
            ]
            if ckpt.exists()
            else []
        )
        if done and max(done) >= at_least:
            break
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.02)
    status = json.loads((workdir / "status.json").read_text())
    assert status["state"] == "running", "the run finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def model_metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput, which no two runs share."""
    records = read_jsonl(workdir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "steps_per_second"} for r in records]


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_reproduce_the_uninterrupted_run(tmp_path):
    env = dict(os.environ)
    straight = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "test accuracy" in straight.stdout

    b = tmp_path / "b"
    killed = run_until_checkpoint(b, 40, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL

    stopped = run_until_checkpoint(b, 100, signal.SIGTERM)
    out = stopped.stdout.read().decode()
    assert stopped.returncode == 0, out[-3000:]
    assert "stopped; checkpoint saved" in out
    status = json.loads((b / "status.json").read_text())
    assert status["state"] == "stopped"
    ckpts = sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == status["step"]  # saved at the step it stopped

    resumed = subprocess.run(command(b), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert model_metrics(b) == model_metrics(tmp_path / "a")
    assert json.loads((b / "status.json").read_text())["state"] == "done"


TINY_RUN = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.mlp_dim=32",
    "data.batch_size=16",
    "train.log_every=3",
    "train.checkpoint_every=4",
    "train.eval_every=0",
    "optimizer.decay=constant",  # the schedule does not depend on train.steps
    "optimizer.warmup_steps=0",
]


def cli(*args: str, steps: int | None = None) -> subprocess.CompletedProcess:
    """The real ``flaxlab`` command in its own process."""
    settings = TINY_RUN + ([f"train.steps={steps}"] if steps else [])
    sets = [a for s in settings for a in ("--set", s)] if args[0] == "train" else []
    return subprocess.run(
        [sys.executable, "-m", "flaxlab.cli", *args, *sets],
        capture_output=True,
        text=True,
    )


def overwrite_data_files(checkpoint: Path) -> None:
    rng = random.Random(0)
    for f in checkpoint.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(rng.randbytes(max(f.stat().st_size, 1)))


@pytest.mark.slow
def test_damaged_checkpoint_is_moved_aside_and_the_run_completes(tmp_path):
    """The new-user scenario: damage the newest checkpoint's data files, evaluate (one clean
    warning line), train on past it (the step it blocked is saved again, its metrics are not
    doubled, the damaged copy is kept), and fail with exit status 1 when nothing is readable."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert cli("train", "vit-digits", "--workdir", str(straight), steps=16).returncode == 0
    assert cli("train", "vit-digits", "--workdir", str(run), steps=12).returncode == 0
    overwrite_data_files(run / "checkpoints" / "12")

    evaluated = cli("eval", str(run))
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("step 8: accuracy")
    assert evaluated.stderr.splitlines() == [
        f"warning: checkpoint {run / 'checkpoints' / '12'} is unreadable (its data files are "
        "corrupt); using step 8 instead"
    ]

    resumed = cli("train", "vit-digits", "--workdir", str(run), "--no-progress", steps=16)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1].startswith("test accuracy: ")
    assert (run / "checkpoints" / "12.damaged" / "params").is_dir()  # kept for inspection
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "12",
        "12.damaged",
        "16",
        "8",
    ]
    assert model_metrics(run) == model_metrics(straight)  # re-trained steps once, as straight

    for step in ("8", "12", "16"):
        overwrite_data_files(run / "checkpoints" / step)
    failed = cli("eval", str(run))
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1] == f"error: {run} holds no readable checkpoint"
