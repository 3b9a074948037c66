"""benchmarks/gpu_suite.py --tiny: every section runs on CPU and reports positive figures.

The suite runs in a subprocess, as a user runs it (tests do not import benchmarks).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"
# section -> how many summary figures it reports on CPU (mfu: at least this many).
EXPECTED_ROWS = {"vit": 2, "favor": 6, "amos": 3, "moe": 3, "vdm": 1, "mfu": 6}


def positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_suite_reports_every_section(tmp_path):
    prefix = tmp_path / "suite"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(prefix)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(Path(f"{prefix}.json").read_text())
    assert Path(f"{prefix}.md").read_text().count("\n|") >= sum(EXPECTED_ROWS.values())
    assert result["meta"]["tiny"] is True
    sections = result["sections"]
    assert set(sections) == set(EXPECTED_ROWS)
    for name, count in EXPECTED_ROWS.items():
        section = sections[name]
        assert section["errors"] == [], (name, section["errors"])
        rows = section["rows"]
        assert len(rows) >= count if name == "mfu" else len(rows) == count, (name, rows)
        for row in rows:
            assert positive_finite(row["value"]), (name, row)
    for detail in sections["vit"]["details"] + sections["vdm"]["details"]:
        for key in ("images_per_s", "step_s", "compile_s", "final_loss"):
            assert positive_finite(detail[key]), (key, detail)
    assert {d["dtype"] for d in sections["vit"]["details"]} == {"bfloat16", "float32"}
    assert {d["length"] for d in sections["favor"]["details"]} == {128, 256}
    assert sections["moe"]["rows"][1]["figure"].startswith("MoE best dispatch")
    # No peak FLOP/s is known for a CPU: MFU is left out rather than guessed.
    assert result["meta"]["peak_flops"] is None
    assert not any("mfu_vs_" in key for d in sections["mfu"]["details"] for key in d)
