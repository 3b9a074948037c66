"""Every family under data, FSDP, tensor-parallel, mixed and expert layouts on 8 fake CPU
devices equals one device, in one subprocess (layouts_script.py)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_every_family_trains_the_same_under_every_layout():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.layouts_script"],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
    )
    assert "LAYOUTS-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-4000:]
