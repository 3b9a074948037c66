"""The AugReg settings on the bundled digits: test accuracy and what the augmentation costs.

For each setting, in one process: the preset's own +-1-pixel random shift; the paper's seven
named settings ``none`` ... ``strong2`` (Inception crop + flip + RandAugment(l, m) + Mixup(alpha),
as ``flaxlab.data.augment`` implements them); and single components on top of the preset's
shift (flip, Inception crop, RandAugment, Mixup, the paper's dropout + stochastic depth 0.1),
to say which part of the recipe helps or hurts on 8x8 digits:

* trains ``vit-digits`` through the estimator and records the test accuracy (one seed; the
  digits test set has 360 images, so one image is 0.28 points) and the training wall time
  (batches prepared in the background, ``train.prefetch``);
* times the data pipeline alone (``batches(step)`` for 50 steps) and the compiled train step
  alone (50 steps).

The augmentation's cost is reported twice, against the ``no augmentation`` setting: the
pipeline's extra time per batch as a fraction of a train step (the cost without prefetching),
and the training wall time as a ratio (what a user waits, prefetch on).
``--render RESULTS.json`` rewrites the table from saved results.

    taskset -c 0 python benchmarks/augreg_digits.py              # about 20 minutes on one core
    python benchmarks/augreg_digits.py --steps 200 --settings preset,light1   # a quick look

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

PAPER = ("none", "light1", "light2", "medium1", "medium2", "strong1", "strong2")
# name -> overrides of vit-digits (the paper's settings replace the preset's shift).
SETTINGS: dict[str, list[str]] = {
    "preset": [],
    "no augmentation": ["data.crop_padding=0"],
    **{name: [f"data.augreg={name}", "data.crop_padding=0"] for name in PAPER},
    "shift+flip": ["data.flip=true"],
    "inception crop": ["data.inception_crop=true", "data.crop_padding=0"],
    "shift+randaug(2 10)": ["data.randaug_layers=2", "data.randaug_magnitude=10"],
    "shift+mixup(0.2)": ["data.mixup_alpha=0.2"],
    "shift+dropout/sd 0.1": ["model.dropout_rate=0.1", "model.drop_path_rate=0.1"],
}
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
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "augreg_digits"))
    parser.add_argument("--render", help="rewrite OUT.md from this results .json, no training")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        Path(args.out + ".md").write_text(markdown(result["meta"], result["rows"]))
        return
    chosen = args.settings.split(",")
    unknown = [name for name in chosen if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown --settings {unknown}; accepted: {list(SETTINGS)}")
    rows = []
    for setting in chosen:
        overrides = [f"train.steps={args.steps}", f"train.seed={args.seed}"]
        overrides += [f"data.seed={args.seed}", "train.eval_every=0", *SETTINGS[setting]]
        config = get_preset("vit-digits", overrides)
        with tempfile.TemporaryDirectory() as workdir:
            estimator = Estimator(config, workdir, progress=False)
            start = time.perf_counter()
            final = estimator.train()
            wall = time.perf_counter() - start
            per_step = step_seconds(estimator, args.timing_steps)
        per_batch = pipeline_seconds(config, args.timing_steps)
        row = {
            "setting": setting,
            "overrides": SETTINGS[setting],
            "inception_crop": config.data.inception_crop,
            "flip": config.data.flip,
            "crop_padding": config.data.crop_padding,
            "randaug": [config.data.randaug_layers, config.data.randaug_magnitude],
            "mixup_alpha": config.data.mixup_alpha,
            "accuracy": final["accuracy"],
            "train_seconds": wall,
            "pipeline_ms_per_batch": per_batch * 1e3,
            "train_step_ms": per_step * 1e3,
        }
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
    Path(args.out + ".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    """The table; the costs are against the setting without any augmentation (if run, else
    the first row): the pipeline's extra time per batch as a fraction of a train step, and the
    training wall time (prefetch on) as a ratio."""
    base = next((r for r in rows if r["setting"] == "no augmentation"), rows[0])
    lines = [
        f"# AugReg settings on digits (vit-digits, {meta['steps']} steps, seed {meta['seed']})",
        "",
        f"Costs against the `{base['setting']}` row. Pipeline overhead: (pipeline "
        "time per batch - its) / train-step time, the cost without prefetching; wall ratio: "
        "training wall time / its, batches prepared in the background (`train.prefetch=2`).",
        "",
        "| setting | shift | Inception crop | flip | RandAugment (l, m) | mixup | test accuracy "
        "| pipeline ms/batch | train step ms | pipeline overhead per step | wall time ratio |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        overhead = (r["pipeline_ms_per_batch"] - base["pipeline_ms_per_batch"]) / r["train_step_ms"]
        ratio = r["train_seconds"] / base["train_seconds"]
        randaug = tuple(r["randaug"]) if r["randaug"][0] else "-"
        crop, flip = ("yes" if r[k] else "-" for k in ("inception_crop", "flip"))
        lines.append(
            f"| {r['setting']} | {r['crop_padding'] or '-'} | {crop} | {flip} | {randaug} "
            f"| {r['mixup_alpha'] or '-'} | {100 * r['accuracy']:.2f}% "
            f"| {r['pipeline_ms_per_batch']:.2f} | {r['train_step_ms']:.2f} "
            f"| {100 * overhead:+.1f}% | {ratio:.2f}x |"
        )
    lines += ["", f"{meta['platform']}, jax {meta['jax']}, {meta['device']}"]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
