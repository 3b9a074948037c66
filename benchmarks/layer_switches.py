"""What the memory and compile-time switches buy: remat policies and scan over layers.

For a ViT of B/16's width, heads and MLP (768, 12, 3072) at depth 12 on the 8x8 digits with
patch 1 and a class token (65 tokens), batch 32, AdamW, on one device, for every
``model.remat`` policy with and without ``model.scan_layers``, in one process:

* activations: the temporary bytes of the compiled gradient program (``flaxlab plan``'s row);
* the whole compiled train step's bytes (arguments + outputs - donated + temporaries);
* the train step's compile time and its median step time (compiled ahead of time, a fixed
  synthetic batch, donated state), as ratios against the plain unrolled loop.

    taskset -c 0 python benchmarks/layer_switches.py     # about 5 minutes on one core
    python benchmarks/layer_switches.py --quick          # depth 4, width 128 (seconds)

Writes benchmarks/results/layer_switches(.quick).json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

import gpu_suite_parts as parts

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [(remat, scan) for scan in (False, True) for remat in ("none", "dots", "full")]
FULL = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, batch=32)
QUICK = dict(hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256, batch=8)


def experiment(sizes: dict, remat: str, scan: bool):
    from flaxlab.configs import get_preset

    overrides = [
        "model.patch_size=1,1",
        "model.classifier=token",
        f"model.hidden_size={sizes['hidden_size']}",
        f"model.num_layers={sizes['num_layers']}",
        f"model.num_heads={sizes['num_heads']}",
        f"model.mlp_dim={sizes['mlp_dim']}",
        f"model.remat={remat}",
        f"model.scan_layers={str(scan).lower()}",
        f"data.batch_size={sizes['batch']}",
        "data.crop_padding=0",
    ]
    return get_preset("vit-digits", overrides)


def measure(config, batch_size: int, budget_s: float) -> dict:
    from flaxlab.train.plan import plan_memory

    plan = plan_memory(config, batch_size=batch_size, num_devices=1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    speed = parts.train_throughput(config, batch, budget_s=budget_s, window=2, min_windows=3)
    return {
        "activations_bytes": plan["rows"]["activations"],
        "step_program_bytes": plan["xla_total"],
        "compile_s": speed["compile_s"],
        "step_s": speed["step_s"],
        "final_loss": speed["final_loss"],
    }


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [
        f"# Remat and scan over layers (ViT, width {sizes['hidden_size']}, depth "
        f"{sizes['num_layers']}, {sizes['num_heads']} heads, MLP {sizes['mlp_dim']}, 65 tokens, "
        f"batch {sizes['batch']}, one device)",
        "",
        f"Command: `{result['command']}`; {result['device']}; {result['wall_s']:.0f} s. "
        "Activations: temporary bytes of the compiled gradient program; step program: the "
        "compiled train step's arguments + outputs - donated + temporaries. Ratios against "
        "the plain loop (remat none, no scan) measured in the same process.",
        "",
        "| remat | scan | activations MiB | vs plain | step program MiB | compile s | vs plain "
        "| step ms | vs plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = result["rows"][0]
    for r in result["rows"]:
        lines.append(
            f"| {r['remat']} | {'yes' if r['scan'] else 'no'} "
            f"| {r['activations_bytes'] / 2**20:.1f} "
            f"| {r['activations_bytes'] / base['activations_bytes']:.2f}x "
            f"| {r['step_program_bytes'] / 2**20:.1f} | {r['compile_s']:.1f} "
            f"| {r['compile_s'] / base['compile_s']:.2f}x | {1e3 * r['step_s']:.1f} "
            f"| {r['step_s'] / base['step_s']:.2f}x |"
        )
    lines += [
        "",
        "The switches change neither the parameters nor the results: outputs, gradients and "
        "random draws equal the plain loop's (tests/models/test_layer_switches.py).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, seconds")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    rows = []
    for remat, scan in SETTINGS:
        out = measure(experiment(sizes, remat, scan), sizes["batch"], 2.0 if args.quick else 8.0)
        rows.append({"remat": remat, "scan": scan, **out})
        print(json.dumps(rows[-1]), flush=True)
    given = sys.argv[1:] if argv is None else argv
    result = {
        "command": " ".join(["python benchmarks/layer_switches.py", *given]),
        "device": f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} usable cores",
        "sizes": sizes,
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    stem = RESULTS / ("layer_switches.quick" if args.quick else "layer_switches")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
