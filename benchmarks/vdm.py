"""VDM benchmarks: CIFAR-10-shaped step/sampling cost, and digits bits/dim per schedule.

Writes benchmarks/results/vdm.json and vdm.md.

1. The reference CIFAR-10 model (32 ResNet blocks x 128 channels, 30.6M parameters) on a
   reduced batch: jitted AdamW training step time and score-network evaluation time; the
   sampling time per image is ``steps`` network evaluations per image.
2. Test bits/dim (K (t, eps) draws per image, 95% interval) against training time on the
   bundled 8x8 digits for the fixed, learned-scalar and learned-net schedules, trained by the
   same plain optax loop in the same process.

Usage:
  python benchmarks/vdm.py            # full (a few minutes on 2 CPU cores)
  python benchmarks/vdm.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.models import vdm

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _train_step_fn(graphdef, rest, tx):
    def loss_fn(params, images, key):
        model = nnx.merge(graphdef, params, rest)
        return model.loss(images, None, key, deterministic=False)

    @jax.jit
    def step(params, opt_state, images, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _make_optimizer(params, lr: float):
    # The reference's AdamW (b2 0.99, weight decay 0.01), without decay on the schedule.
    return optax.adamw(
        lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, mask=vdm.weight_decay_mask(params)
    )


def cifar_timing(batch: int, timed_steps: int, depth: int | None = None) -> dict:
    """Training-step and network-evaluation time of the CIFAR-10 configuration."""
    config = vdm.vdm_preset("cifar10")
    if depth is not None:
        config = dataclasses.replace(config, depth=depth)
    t0 = time.perf_counter()
    model = nnx.jit(lambda: vdm.VDM(config, rngs=nnx.Rngs(0)))()
    init_s = time.perf_counter() - t0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx = _make_optimizer(params, 2e-4)
    opt_state = tx.init(params)
    step = _train_step_fn(graphdef, rest, tx)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3)).astype(np.uint8)

    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, images, jax.random.key(0))
    loss.block_until_ready()
    first_step_s = time.perf_counter() - t0
    times = []
    for i in range(timed_steps):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, images, jax.random.key(i + 1))
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)

    model = nnx.merge(graphdef, params, rest)
    net_graphdef, net_state = nnx.split(model.score)

    @jax.jit
    def evaluate(state, z, gamma):
        return nnx.merge(net_graphdef, state)(z, gamma)

    z = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    gamma = jnp.full((batch,), -2.0)
    evaluate(net_state, z, gamma).block_until_ready()
    eval_times = []
    for _ in range(max(timed_steps, 2)):
        t0 = time.perf_counter()
        evaluate(net_state, z, gamma).block_until_ready()
        eval_times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    eval_s = float(np.median(eval_times))
    return {
        "depth": config.depth,
        "width": config.width,
        "parameters": n_params,
        "batch": batch,
        "init_s": init_s,
        "first_step_s_incl_compile": first_step_s,
        "train_step_s": step_s,
        "train_step_s_per_image": step_s / batch,
        "net_eval_s": eval_s,
        "net_eval_s_per_image": eval_s / batch,
        "sampling_s_per_image_1000_steps": 1000 * eval_s / batch,
        "loss_bpd_after_steps": float(loss),
    }


def cifar_extrapolated(batch: int, timed_steps: int, depths=(2, 6)) -> dict:
    """CIFAR-10 configuration cost at two depths, extrapolated linearly to the full 32 blocks.

    Every extra unit of depth adds one down and one up ResNet block at the same 32x32
    resolution and width, so cost is affine in depth; compiling the fully unrolled 32-block
    model takes many minutes on this CPU, the two shallower models do not.
    """
    full = vdm.vdm_preset("cifar10")
    shape_only = nnx.eval_shape(lambda: vdm.VDM(full, rngs=nnx.Rngs(0)))
    n_full = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(shape_only, nnx.Param)))
    runs = [cifar_timing(batch, timed_steps, depth=d) for d in depths]
    d1, d2 = depths
    out = {
        "depth": full.depth,
        "width": full.width,
        "parameters": n_full,
        "batch": batch,
        "extrapolated_from_depths": list(depths),
        "runs": runs,
    }
    for key in ("train_step_s", "net_eval_s"):
        slope = (runs[1][key] - runs[0][key]) / (d2 - d1)
        out[key] = runs[0][key] + slope * (full.depth - d1)
    out["train_step_s_per_image"] = out["train_step_s"] / batch
    out["net_eval_s_per_image"] = out["net_eval_s"] / batch
    out["sampling_s_per_image_1000_steps"] = 1000 * out["net_eval_s"] / batch
    out["first_step_s_incl_compile"] = runs[1]["first_step_s_incl_compile"]
    return out


def load_digits_uint8():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return images, data.target.astype(np.int32)


def digits_schedules(
    steps: int, evals: int, batch: int, draws: int, schedules, samples_png=None
) -> dict:
    """Test bits/dim vs training time for each schedule (same data order, same seed).

    With ``samples_png``, the last schedule's model draws 64 digits with 100 DDIM steps and 64
    with 1000 ancestral steps, written side by side as a PNG.
    """
    images, _ = load_digits_uint8()
    train, test = images[:1500], images[1500:]
    out = {}
    final_per_image = {}
    for kind in schedules:
        config = vdm.vdm_preset("digits", schedule=kind, schedule_features=64)
        model = nnx.jit(lambda c=config: vdm.VDM(c, rngs=nnx.Rngs(0)))()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.chain(optax.clip_by_global_norm(1.0), _make_optimizer(params, 2e-3))
        opt_state = tx.init(params)
        step = _train_step_fn(graphdef, rest, tx)

        @jax.jit
        def test_bpd(params, key, graphdef=graphdef, rest=rest):
            model = nnx.merge(graphdef, params, rest)
            per_image = vdm.evaluate_bpd(model, test, None, key, num_draws=draws)["bpd"]
            g0, g1 = model.schedule.endpoints()
            return per_image, g0, g1

        rng = np.random.default_rng(0)
        curve = []
        train_s = 0.0
        eval_points = set(np.linspace(0, steps, evals + 1).astype(int).tolist())
        for i in range(steps + 1):
            if i in eval_points:
                per_image, g0, g1 = test_bpd(params, jax.random.key(10_000))
                per_image = np.asarray(per_image, np.float64)
                mean, half = vdm.bpd_confidence_interval(
                    per_image.sum(), (per_image**2).sum(), len(test)
                )
                final_per_image[kind] = per_image
                curve.append(
                    {
                        "step": i,
                        "train_s": round(train_s, 2),
                        "test_bpd": mean,
                        "ci95": half,
                        "gamma_0": float(g0),
                        "gamma_1": float(g1),
                    }
                )
            if i == steps:
                break
            batch_images = train[rng.integers(0, len(train), batch)]
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, batch_images, jax.random.key(i))
            loss.block_until_ready()
            if i > 0:  # the first step includes compilation
                train_s += time.perf_counter() - t0
        out[kind] = curve
        last_model = (kind, nnx.merge(graphdef, params, rest))
    if samples_png is not None:
        from PIL import Image

        kind, model = last_model
        t0 = time.perf_counter()
        ddim = vdm.sample(model, jax.random.key(1), 64, 100, sampler="ddim")
        ancestral = vdm.sample(model, jax.random.key(2), 64, 1000)
        grids = [vdm.image_grid(np.asarray(x), columns=8) for x in (ddim, ancestral)]
        gap = np.zeros((grids[0].shape[0], 4, 1), np.uint8)
        picture = np.concatenate([grids[0], gap, grids[1]], axis=1)[..., 0]
        Image.fromarray(picture).resize((picture.shape[1] * 4, picture.shape[0] * 4), 0).save(
            samples_png
        )
        out["samples"] = {
            "schedule": kind,
            "png": str(samples_png.name),
            "left": "DDIM, 100 steps",
            "right": "ancestral, 1000 steps",
            "seconds_incl_compile": time.perf_counter() - t0,
        }
    # Paired comparison on the same test images and the same (t, eps) draws.
    if "fixed" in final_per_image:
        paired = {}
        for kind, values in final_per_image.items():
            if kind == "fixed":
                continue
            diff = values - final_per_image["fixed"]
            mean, half = vdm.bpd_confidence_interval(diff.sum(), (diff**2).sum(), len(diff))
            paired[kind] = {"mean_bpd_minus_fixed": mean, "ci95": half}
        out["paired_vs_fixed"] = paired
    return out


def to_markdown(result: dict) -> str:
    c = result["cifar10"]
    lines = [
        "# VDM benchmarks",
        "",
        f"Device: {result['device']}; command: `{result['command']}`; 1-minute load average"
        f" at start/end {result.get('load_average_start_end')} (other jobs share the CPU: times"
        " are upper bounds).",
        "",
        "## Reference CIFAR-10 configuration "
        f"({c['depth']} blocks x {c['width']} channels, {c['parameters']:,} parameters)",
        "",
        "| batch | train step (s) | per image (s) | net eval per image (s) "
        "| 1000-step sampling per image (s) | first step incl. compile (s) |",
        "|---|---|---|---|---|---|",
        f"| {c['batch']} | {c['train_step_s']:.2f} | {c['train_step_s_per_image']:.2f} "
        f"| {c['net_eval_s_per_image']:.3f} | {c['sampling_s_per_image_1000_steps']:.0f} "
        f"| {c['first_step_s_incl_compile']:.1f} |",
        "",
        "## Digits (8x8, 256 levels): test bits/dim (95% CI) vs training time",
        "",
        "| schedule | step | train s | test bpd | +- | gamma_0 | gamma_1 |",
        "|---|---|---|---|---|---|---|",
    ]
    if "runs" in c:
        lines[9:9] = [
            "",
            f"Full-depth times extrapolated (affine in depth) from depths "
            f"{c['extrapolated_from_depths']}; compile time is that of depth "
            f"{c['extrapolated_from_depths'][-1]}. Measured:",
            "",
        ] + [
            f"- depth {r['depth']}: train step {r['train_step_s']:.2f} s, "
            f"net eval {r['net_eval_s']:.3f} s (batch {r['batch']})"
            for r in c["runs"]
        ]
    for kind, curve in result["digits"].items():
        if kind in ("paired_vs_fixed", "samples"):
            continue
        for p in curve:
            lines.append(
                f"| {kind} | {p['step']} | {p['train_s']:.1f} | {p['test_bpd']:.3f} "
                f"| {p['ci95']:.3f} | {p['gamma_0']:.2f} | {p['gamma_1']:.2f} |"
            )
    extras = ("paired_vs_fixed", "samples")
    final = {k: v[-1]["test_bpd"] for k, v in result["digits"].items() if k not in extras}
    if "fixed" in final:
        lines += [
            "",
            "Final test bpd relative to the fixed schedule: "
            + ", ".join(f"{k} {v / final['fixed']:.3f}x" for k, v in final.items()),
        ]
        for kind, p in result["digits"].get("paired_vs_fixed", {}).items():
            lines.append(
                f"- {kind} minus fixed, paired per test image: {p['mean_bpd_minus_fixed']:+.4f}"
                f" +- {p['ci95']:.4f} bpd (95%)"
            )
    if "samples" in result["digits"]:
        info = result["digits"]["samples"]
        lines += [
            "",
            f"Samples of the {info['schedule']} model: `{info['png']}` (left: {info['left']}; "
            f"right: {info['right']}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on toy sizes")
    parser.add_argument("--cifar-batch", type=int, default=4)
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    if args.quick:
        cifar = cifar_timing(batch=1, timed_steps=1, depth=2)
        digits = digits_schedules(
            steps=20, evals=1, batch=32, draws=1, schedules=("fixed", "learned_scalar")
        )
    else:
        cifar = cifar_extrapolated(batch=args.cifar_batch, timed_steps=2)
        digits = digits_schedules(
            steps=args.digits_steps,
            evals=5,
            batch=64,
            draws=4,
            schedules=("fixed", "learned_net", "learned_scalar"),
            samples_png=args.out / "vdm.digits_samples.png",
        )
    result = {
        "command": "python benchmarks/vdm.py" + (" --quick" if args.quick else ""),
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
        f" {jax.device_count()} device(s))",
        "jax": jax.__version__,
        "load_average_start_end": [round(load_start[0], 1), round(os.getloadavg()[0], 1)],
        "cifar10": cifar,
        "digits": digits,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "vdm.quick" if args.quick else "vdm"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
