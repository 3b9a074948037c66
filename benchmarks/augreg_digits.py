"""The AugReg settings on the bundled digits: test accuracy and what the augmentation costs.

For each setting (the preset's own ±1-pixel random crop, then the paper's ``none`` ...
``strong2``: Inception crop + flip + RandAugment(l, m) + Mixup(alpha) as
``flaxlab.data.augment`` implements them), in one process:

* trains ``vit-digits`` with ``data.augreg=<setting>`` through the estimator and records the
  test accuracy (one seed; the digits test set has 360 images, so one image is 0.28 points);
* times the data pipeline alone (``batches(step)`` for 50 steps) and the compiled train step
  alone (50 steps), and reports the augmentation's overhead per step: (pipeline time of the
  setting - pipeline time of the preset's plain crop) / train-step time.

    taskset -c 0 python benchmarks/augreg_digits.py              # about 10 minutes on one core
    python benchmarks/augreg_digits.py --steps 200 --settings none,light1   # a quick look

Writes benchmarks/results/augreg_digits.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax

from flaxlab.configs import get_preset
from flaxlab.data.factory import make_data
from flaxlab.train import Estimator, sharding

SETTINGS = ("preset", "none", "light1", "light2", "medium1", "medium2", "strong1", "strong2")
RESULTS = Path(__file__).parent / "results"


def pipeline_seconds(config, steps: int) -> float:
    """Seconds per batch of the host data pipeline (loading, augmenting, mixing)."""
    batches = make_data(config.data)[0]
    batches(0)  # loads the data set
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batches(step)
    return (time.perf_counter() - start) / steps


def step_seconds(estimator: Estimator, steps: int) -> float:
    """Seconds per compiled train step on a fixed batch (compilation excluded)."""
    batch = sharding.shard_batch(make_data(estimator.config.data)[0](0), estimator.mesh)
    train_step = estimator.make_train_step()
    state, metrics = train_step(estimator.init_state(), batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per setting")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "augreg_digits"))
    args = parser.parse_args()
    rows = []
    base_pipeline = None
    for setting in args.settings.split(","):
        overrides = [f"train.steps={args.steps}", f"train.seed={args.seed}"]
        overrides += [f"data.seed={args.seed}", "train.eval_every=0"]
        if setting != "preset":
            overrides += [f"data.augreg={setting}", "data.crop_padding=0"]
        config = get_preset("vit-digits", overrides)
        with tempfile.TemporaryDirectory() as workdir:
            estimator = Estimator(config, workdir, progress=False)
            start = time.perf_counter()
            final = estimator.train()
            wall = time.perf_counter() - start
            per_step = step_seconds(estimator, args.timing_steps)
        per_batch = pipeline_seconds(config, args.timing_steps)
        if setting == "preset":
            base_pipeline = per_batch
        row = {
            "setting": setting,
            "randaug": [config.data.randaug_layers, config.data.randaug_magnitude],
            "mixup_alpha": config.data.mixup_alpha,
            "accuracy": final["accuracy"],
            "train_seconds": wall,
            "pipeline_ms_per_batch": per_batch * 1e3,
            "train_step_ms": per_step * 1e3,
        }
        if base_pipeline is not None:
            row["overhead_per_step"] = (per_batch - base_pipeline) / per_step
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": get_preset("vit-digits").data.batch_size,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# AugReg settings on digits (vit-digits, {args.steps} steps, seed {args.seed})",
        "",
        "| setting | RandAugment (l, m) | mixup | test accuracy | pipeline ms/batch | "
        "train step ms | augmentation overhead per step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        overhead = r.get("overhead_per_step")
        lines.append(
            f"| {r['setting']} | {tuple(r['randaug']) if r['setting'] != 'preset' else '-'} "
            f"| {r['mixup_alpha']} | {100 * r['accuracy']:.2f}% "
            f"| {r['pipeline_ms_per_batch']:.2f} | {r['train_step_ms']:.2f} "
            f"| {'-' if overhead is None else f'{100 * overhead:+.1f}%'} |"
        )
    lines += ["", f"{meta['platform']}, jax {meta['jax']}, {meta['device']}"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
