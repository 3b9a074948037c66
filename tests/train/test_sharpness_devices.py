"""SAM and GSAM on 8 fake CPU devices, both scopes, every family (sharpness_script.py)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sharpness_scopes_and_families_on_8_devices(tmp_path):
    env = dict(os.environ, WORK=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.sharpness_script"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "SHARPNESS-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-4000:]
