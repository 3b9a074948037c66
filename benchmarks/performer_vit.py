"""Performer-ViT vs softmax ViT on the bundled 8x8 digits (issue: FAVOR+ study iii).

Trains the ``vit-digits`` preset through the estimator, exactly as ``flaxlab train`` does, with
the exact softmax attention and with FAVOR+ dropped in (``--set model.attention.kind=favor``):
positive orthogonal random features (several feature counts) and the deterministic ReLU
kernel. Each configuration is trained with several seeds (initialisation, dropout, data order
and the FAVOR+ projection all follow ``train.seed``); reported: test accuracy (mean, std and
every seed), final test cross-entropy and wall time.

    python benchmarks/performer_vit.py                 # 2 seeds, ~10 minutes on 2 CPU cores
    python benchmarks/performer_vit.py --seeds 0 --steps 300   # quick look

Writes benchmarks/results/performer_vit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax

from flaxlab.configs import get_preset
from flaxlab.train import Estimator

RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    "softmax (exact)": [],
    "FAVOR+ softmax, M=16": [
        "model.attention.kind=favor",
        "model.attention.num_features=16",
    ],
    "FAVOR+ softmax, M=64": [
        "model.attention.kind=favor",
        "model.attention.num_features=64",
    ],
    "FAVOR+ softmax, M=64, redraw every 100": [
        "model.attention.kind=favor",
        "model.attention.num_features=64",
        "model.attention.redraw_every=100",
    ],
    "FAVOR+ ReLU (deterministic)": [
        "model.attention.kind=favor",
        "model.attention.favor_kernel=relu",
        "model.attention.feature_type=deterministic",
    ],
}


def run(overrides: list[str], seed: int, steps: int | None, workdir: Path) -> dict:
    extra = [f"train.seed={seed}", "train.eval_every=0"]
    if steps:
        extra.append(f"train.steps={steps}")
    config = get_preset("vit-digits", overrides + extra)
    start = time.perf_counter()
    final = Estimator(config, workdir, progress=False).train()
    return {
        "seed": seed,
        "accuracy": final["accuracy"],
        "cross_entropy": final.get("cross_entropy", final.get("loss")),
        "seconds": time.perf_counter() - start,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=str, default="0,1", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--only", type=str, help="comma-separated substrings of config names")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = list(CONFIGS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        names = [n for n in names if any(w in n for w in wanted)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs = []
            for seed in seeds:
                workdir = Path(tmp) / f"{len(rows)}-{seed}"
                runs.append(run(CONFIGS[name], seed, args.steps, workdir))
                print(name, json.dumps(runs[-1]), flush=True)
            accs = [r["accuracy"] for r in runs]
            rows.append(
                {
                    "config": name,
                    "overrides": CONFIGS[name],
                    "runs": runs,
                    "accuracy_mean": statistics.mean(accs),
                    "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seconds_mean": statistics.mean(r["seconds"] for r in runs),
                }
            )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {
        "device": f"{jax.devices()[0].platform} ({platform.machine()}, {cores} cores usable)",
        "seeds": seeds,
        "steps": args.steps or get_preset("vit-digits").train.steps,
        "command": "python benchmarks/performer_vit.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
    }
    RESULTS.mkdir(exist_ok=True)
    tag = "" if args.steps is None and args.only is None else ".partial"
    (RESULTS / f"performer_vit{tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    lines = [
        "# Performer-ViT vs softmax ViT on the bundled digits",
        "",
        f"`vit-digits` preset ({meta['steps']} steps), test set of 360 images; "
        f"device {meta['device']}; seeds {seeds}; command: `{meta['command']}`.",
        "",
        "| attention | test accuracy (mean +- std) | per seed | test cross-entropy | s per run |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{x['accuracy']:.4f}" for x in r["runs"])
        ce = statistics.mean(x["cross_entropy"] for x in r["runs"])
        lines.append(
            f"| {r['config']} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | "
            f"{per_seed} | {ce:.4f} | {r['seconds_mean']:.0f} |"
        )
    (RESULTS / f"performer_vit{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
