"""The memory part of benchmarks/amos.py (jax.eval_shape only, nothing allocated)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "amos.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("amos_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bert_base_tree_has_the_known_size_and_half_of_adamws_slot_memory(benchmark):
    params = benchmark.as_structs(benchmark.bert_shapes(*benchmark.SIZES["base"]))
    rows = {row["optimizer"]: row for row in benchmark.memory_rows(params, "BERT-base")}
    # BERT-base encoder (~85M) + embeddings (~24M) + MLM head; 12 blocks of 7.09M each.
    assert rows["adamw"]["parameters"] == 109_514_298
    # The paper's measurement: 50.1% with factored slots and momentum 0.9.
    assert rows["amos factored + momentum 0.9"]["ratio_to_adamw"] == pytest.approx(0.501, abs=5e-4)
    assert rows["amos factored, no momentum"]["ratio_to_adamw"] < 0.002


def test_quick_timing_runs_on_a_toy_tree(benchmark):
    shapes = benchmark.bert_shapes(*benchmark.SIZES["toy"])
    medians, parameters = benchmark.time_updates(
        shapes, {"adamw": benchmark.adamw(), "amos": benchmark.amos_default()}, repeats=2
    )
    assert parameters == 45_204
    assert set(medians) == {"adamw", "amos"} and all(t > 0 for t in medians.values())
