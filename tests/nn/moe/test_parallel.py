"""Expert parallelism (jax.shard_map + all_to_all) equals the single-device layer."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_expert_parallel_equals_single_device():
    result = subprocess.run(
        [sys.executable, "-m", "tests.nn.moe.parallel_script"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PARALLEL OK" in result.stdout
