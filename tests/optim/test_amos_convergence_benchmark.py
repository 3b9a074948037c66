"""The core of benchmarks/amos_convergence.py on toy sizes: the target/ratio logic and the LM."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "amos_convergence.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("amos_convergence_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_summary_targets_the_best_final_adamw_loss_and_counts_amos_steps(benchmark):
    runs = {
        "amos": {"steps": [10, 20, 30, 40], "losses": [3.0, 2.0, 1.4, 1.2]},
        "adamw lr=0.001": {"steps": [10, 20, 30, 40], "losses": [3.0, 2.5, 2.0, 1.8]},
        "adamw lr=0.01": {"steps": [10, 20, 30, 40], "losses": [2.8, 2.0, 1.6, 1.5]},
    }
    summary = benchmark.summarize(runs, total_steps=40)
    assert summary["best_adamw"] == "adamw lr=0.01"
    assert summary["target_loss"] == 1.5
    assert summary["amos_steps_to_target"] == 30 and summary["ratio"] == 0.75
    runs["amos"]["losses"] = [3.0, 2.9, 2.8, 2.7]
    assert benchmark.summarize(runs, total_steps=40)["ratio"] is None


def test_byte_lm_runs_with_amos_on_toy_sizes(benchmark):
    study = benchmark.Study(
        lm_steps=3,
        lm_eval_every=3,
        lm_seq_len=8,
        lm_batch=2,
        lm_hidden=16,
        lm_layers=1,
        lm_heads=2,
        lm_eval_batches=1,
    )
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, 500).astype(np.int32), rng.integers(0, 256, 100).astype(np.int32))
    steps, losses, seconds = benchmark.lm_curve(study, "amos", None, data)
    assert steps == [3] and np.isfinite(losses[0]) and seconds > 0
    assert abs(losses[0] - np.log(256)) < 1.0  # near uniform over bytes after 3 steps
