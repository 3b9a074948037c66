"""Training throughput through the estimator vs a minimal hand-written jax.jit + optax step.

For each model, in one process: the same model, optimizer (AdamW, global-norm clipping) and
synthetic data, trained (a) by ``flaxlab.train.Estimator`` (its hot loop: data pipeline,
sharding, metrics kept on device, logging syncs) and (b) by a bare loop of a jitted, donated
``value_and_grad`` + ``optax`` step. Compilation is excluded from both. The runs alternate
(a, b, a, b, ...) and the medians are compared: ratio = estimator / hand-written images/s.

    python benchmarks/train_throughput.py            # CPU defaults: 64x64 images, batch 8
    python benchmarks/train_throughput.py --quick    # seconds: tiny models
    python benchmarks/train_throughput.py --image-size 224 --batch 64 --steps 50   # on a GPU

Writes benchmarks/results/train_throughput.json and .md.
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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.models import MixerConfig, ViTConfig
from flaxlab.train import (
    DataConfig,
    Estimator,
    ExperimentConfig,
    OptimizerConfig,
    TrainConfig,
    make_task,
)
from flaxlab.train.metrics import read_jsonl

RESULTS = Path(__file__).parent / "results"


def experiment(family, model, data_path, batch, steps, log_every) -> ExperimentConfig:
    return ExperimentConfig(
        family=family,
        model=model,
        data=DataConfig(
            name="npz", path=data_path, eval_path=data_path, batch_size=batch, eval_batch_size=batch
        ),
        optimizer=OptimizerConfig(
            name="adamw", learning_rate=1e-4, warmup_steps=0, decay="constant", grad_clip_norm=1.0
        ),
        train=TrainConfig(steps=steps, log_every=log_every, checkpoint_every=10**9, eval_every=0),
    )


def estimator_rate(config: ExperimentConfig) -> float:
    """Images/s of the estimator's loop over the steps after the first (compiling) window."""
    with tempfile.TemporaryDirectory() as workdir:
        estimator = Estimator(config, Path(workdir) / "run", progress=False)
        estimator.train()
        records = [
            r
            for r in read_jsonl(Path(workdir) / "run" / "metrics.jsonl")
            if r["split"] == "train" and "steps_per_second" in r
        ]
    return statistics.median(r["steps_per_second"] for r in records) * config.data.batch_size


def hand_written_rate(config: ExperimentConfig, images, labels, steps: int) -> float:
    """Images/s of a bare jitted value_and_grad + optax AdamW step."""
    task = make_task(config)
    model = task.init_model(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=1e-4))
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    batch = config.data.batch_size
    n = images.shape[0]

    def host_batch(i):
        idx = (np.arange(batch) + i * batch) % n
        return (jnp.asarray(images[idx].astype(np.float32) / 127.5 - 1.0), jnp.asarray(labels[idx]))

    params, opt_state, loss = step(params, opt_state, *host_batch(0))
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, *host_batch(i))
    jax.block_until_ready(loss)
    return steps * batch / (time.perf_counter() - start)


def models(image_size: int, quick: bool):
    if quick:
        tiny = dict(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64)
        return {
            "ViT-tiny/16": (
                "vit",
                ViTConfig.variant("Ti/16", num_classes=10, image_size=image_size, **tiny),
            ),
            "Mixer-tiny/16": (
                "mixer",
                MixerConfig.variant(
                    "S/16",
                    num_classes=10,
                    image_size=image_size,
                    num_blocks=1,
                    hidden_size=32,
                    tokens_mlp_dim=16,
                    channels_mlp_dim=64,
                ),
            ),
        }
    return {
        f"ViT-{v}": ("vit", ViTConfig.variant(v, num_classes=10, image_size=image_size))
        for v in ("Ti/16", "S/16", "B/16")
    } | {
        "Mixer-B/16": ("mixer", MixerConfig.variant("B/16", num_classes=10, image_size=image_size))
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", type=str, help="comma-separated names, e.g. Mixer-B/16")
    parser.add_argument("--tag", type=str, help="results name suffix")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.steps, args.repeats = 32, 10, 2

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=64).astype(np.int32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "synthetic.npz")
        np.savez(data_path, image=images, label=labels)
        chosen = models(args.image_size, args.quick)
        if args.models:
            wanted = args.models.split(",")
            unknown = sorted(set(wanted) - set(chosen))
            if unknown:
                parser.error(f"unknown --models {unknown}; accepted: {sorted(chosen)}")
            chosen = {k: v for k, v in chosen.items() if k in wanted}
        for name, (family, model) in chosen.items():
            # One untimed window compiles; the next windows of `steps` steps are timed.
            config = experiment(
                family, model, data_path, args.batch, steps=args.steps * 3, log_every=args.steps
            )
            est, hand = [], []
            for _ in range(args.repeats):
                est.append(estimator_rate(config))
                hand.append(hand_written_rate(config, images, labels, args.steps))
            row = {
                "model": name,
                "image_size": args.image_size,
                "batch": args.batch,
                "estimator_images_per_s": statistics.median(est),
                "hand_written_images_per_s": statistics.median(hand),
            }
            row["ratio"] = row["estimator_images_per_s"] / row["hand_written_images_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = (
        f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()}, "
        f"{cores} core{'s' if cores != 1 else ''} usable)"
    )
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f".{args.tag}" if args.tag else "")
    (RESULTS / f"train_throughput{suffix}.json").write_text(
        json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1)
    )
    lines = [
        f"Training throughput, estimator vs hand-written step ({device}; images "
        f"{args.image_size}x{args.image_size}, batch {args.batch}, median of {args.repeats})",
        "",
        "| model | estimator img/s | hand-written img/s | ratio |",
        "| --- | ---: | ---: | ---: |",
    ] + [
        f"| {r['model']} | {r['estimator_images_per_s']:.1f} | "
        f"{r['hand_written_images_per_s']:.1f} | {r['ratio']:.3f} |"
        for r in rows
    ]
    (RESULTS / f"train_throughput{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
