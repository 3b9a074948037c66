"""Multi-host runs through the CLI: 2 processes on 127.0.0.1 with 2 CPU devices each.

They must train the model of one process with 4 devices step for step, and a SIGTERM sent to
one of them must stop both at the same step with one checkpoint.
"""

import json
import os
import signal
import socket
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
    "optimizer.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir: Path, steps: int, extra=()) -> list[str]:
    args = [sys.executable, "-m", "flaxlab.cli", "train", "vit-digits", "--workdir", str(workdir)]
    for s in [*SETTINGS, f"train.steps={steps}", f"train.checkpoint_every={steps}"]:
        args += ["--set", s]
    return args + ["--no-progress", *extra]


def env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def start_pair(workdir: Path, steps: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for pid in range(2):
        flags = ["--distributed", "--coordinator", f"127.0.0.1:{port}"]
        flags += ["--num-processes", "2", "--process-id", str(pid)]
        procs.append(
            subprocess.Popen(
                command(workdir, steps, flags),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env(2),
                text=True,
            )
        )
    return procs


def finish(procs, timeout=300) -> list[str]:
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outs.append(out)
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    return outs


def train_losses(workdir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"
    }


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    one = subprocess.run(command(tmp_path / "one", 6), capture_output=True, text=True, env=env(4))
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    outs = finish(start_pair(tmp_path / "two", 6))
    assert "test accuracy" in outs[0] and "test accuracy" not in outs[1]  # process 0 reports
    assert outs[0].splitlines()[-1] == one.stdout.splitlines()[-1]
    mine, theirs = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert sorted(mine) == list(range(1, 7)) == sorted(theirs)  # one record per step, no copies
    for step in mine:
        assert abs(mine[step] - theirs[step]) < 1e-5, (step, mine[step], theirs[step])
    assert json.loads((tmp_path / "two" / "status.json").read_text())["state"] == "done"
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["6"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    procs = start_pair(workdir, 100000)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(train_losses(workdir)) < 3:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    status = json.loads((workdir / "status.json").read_text())
    assert status["state"] == "stopped", status
    stopped = status["step"]
    assert stopped % 10 == 0 and stopped < 100000
    checkpoints = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert checkpoints == [str(stopped)], checkpoints
    assert f"stopped by signal {int(signal.SIGTERM)} at step {stopped}" in outs[1]
    assert f"stopped by a signal to another process at step {stopped}" in outs[0]
    assert "run the same command to resume" in outs[0]
    # The metrics stop at the checkpoint: nothing past it, nothing twice.
    steps = sorted(train_losses(workdir))
    assert steps == list(range(1, stopped + 1))
