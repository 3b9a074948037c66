"""Data parallelism on 8 fake CPU devices, in one subprocess (multidevice_script.py)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_data_parallel_on_8_devices_matches_one_device(tmp_path):
    env = dict(os.environ, WORK=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.multidevice_script"],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.getcwd(),
    )
    assert "MULTIDEVICE-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
