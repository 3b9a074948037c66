"""Helpers of benchmarks/gpu_suite.py: peak FLOP/s, timing, XLA cost figures, training steps.

Peak FLOP/s per accelerator (dense, no 2:4 sparsity) come from NVIDIA's H200 and H100 product
pages (https://www.nvidia.com/en-us/data-center/h200/ and .../h100/), whose tables list
BFLOAT16 Tensor Core 1,979 TFLOP/s and TF32 Tensor Core 989 TFLOP/s "with sparsity" (dense:
half, 989.5 and 494.5) and FP32 67 TFLOP/s for the SXM boards (H200 NVL: 1,671 / 835 / 60).
Secondary sources found while writing this (https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-
precisions-cores.html: "FP16 / BF16 (dense) ~989 TFLOPS"; https://hmc-tech.com/gpu/nvidia-h100-
vs-nvidia-h200-sxm-vs-nvidia-gb200: FP32 66.91 TFLOPS) agree. On GPUs JAX runs float32 matmuls
on TF32 tensor cores by default, so float32 rows report MFU against both the FP32 and the TF32
peak.
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

# device-kind substring -> dense peak FLOP/s by compute dtype (first match wins: NVL first).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bfloat16": 835.5e12, "tf32": 417.5e12, "float32": 60e12}),
    ("H200", {"bfloat16": 989.5e12, "tf32": 494.5e12, "float32": 67e12}),
    ("H100 NVL", {"bfloat16": 835.5e12, "tf32": 417.5e12, "float32": 60e12}),
    ("H100 PCIe", {"bfloat16": 756.5e12, "tf32": 378e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989.5e12, "tf32": 494.5e12, "float32": 67e12}),
)


def device_peaks() -> dict[str, float] | None:
    """Dense peak FLOP/s by dtype of the first device, or None (CPU, unknown accelerators)."""
    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        return None
    for name, peaks in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peaks
    return None


def describe_device() -> str:
    device = jax.devices()[0]
    cores = len(__import__("os").sched_getaffinity(0))
    return (
        f"{device.device_kind} ({jax.default_backend()}) x{jax.device_count()}, jax "
        f"{jax.__version__}, host {platform.machine()} with {cores} usable cores"
    )


def cost_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program (None when it gives none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_bytes(compiled) -> int | None:
    """Argument + output + temporary bytes of a compiled program (outputs aliasing donated
    arguments counted once)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """``(compiled, seconds)`` of ``jitted.lower(*args).compile()``."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def compile_all(
    variants: dict[str, tuple[Callable, tuple]],
) -> tuple[dict[str, Callable[[], Any]], dict[str, tuple[Any, float]], list[str]]:
    """Compiles each ``name: (jitted, args)``: ``(calls, {name: (compiled, compile_s)},
    errors)``, where a call runs the compiled program on its arguments and a variant that
    fails to compile (an unsupported kernel on this device) becomes an error line instead."""
    calls, info, errors = {}, {}, []
    for name, (jitted, args) in variants.items():
        try:
            compiled, seconds = compile_timed(jitted, *args)
        except Exception as error:
            errors.append(f"{name}: {type(error).__name__}: {str(error)[:300]}")
            continue
        calls[name] = lambda compiled=compiled, args=args: compiled(*args)
        info[name] = (compiled, seconds)
    return calls, info, errors


def interleaved_median(
    calls: dict[str, Callable[[], Any]],
    *,
    budget_s: float,
    min_reps: int = 3,
    max_reps: int = 50,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Median wall seconds of each call, the calls interleaved round by round.

    Each call is run ``warmup`` times first (untimed), then once per round, its result blocked
    on (``jax.block_until_ready``) inside the timed span. Rounds continue until ``max_reps``,
    or until ``min_reps`` rounds are done and ``budget_s`` seconds have passed.
    """
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for rep in range(max_reps):
        if rep >= min_reps and time.perf_counter() - start > budget_s:
            break
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "reps": len(t)}
        for name, t in times.items()
    }


def adamw_config():
    """The optimizer of the training benchmarks: AdamW at a constant 1e-3, weight decay 1e-4 on
    kernels, global-norm clipping at 1."""
    from flaxlab.optim.factory import OptimizerConfig

    return OptimizerConfig(
        name="adamw",
        learning_rate=1e-3,
        warmup_steps=0,
        decay="constant",
        weight_decay=1e-4,
        grad_clip_norm=1.0,
    )


def vit_forward_flops(config) -> float:
    """Forward FLOPs of one image through a ViT (a multiply-add is 2 FLOPs): patch embedding,
    per block the q/k/v/out projections (8 T D^2), scores and weighted sum (4 T^2 D) and the MLP
    (4 T D M), then the head. Layer norms, softmax and GELU are left out (< 1%)."""
    grid = config.grid_size
    patches = grid[0] * grid[1]
    tokens = patches + (1 if config.classifier == "token" else 0)
    d, m = config.hidden_size, config.mlp_dim
    embed = 2 * patches * config.patch_size[0] * config.patch_size[1] * config.num_channels * d
    block = 8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * m
    return float(embed + config.num_layers * block + 2 * d * config.num_classes)


def train_throughput(
    config, batch: dict[str, np.ndarray], *, budget_s: float, window: int, min_windows: int
) -> dict[str, Any]:
    """Images/s of the estimator's jitted, donated train step on a fixed synthetic batch.

    The step is ``Estimator.make_train_step()`` (flaxlab.train.step.make_train_step under
    ``jax.jit`` with the mesh's shardings), compiled ahead of time; ``window`` steps are
    dispatched back to back and blocked on at the end, and the median window is reported.
    """
    from flaxlab.train import Estimator
    from flaxlab.train.sharding import shard_batch

    with tempfile.TemporaryDirectory() as tmp:
        estimator = Estimator(config, Path(tmp) / "run", progress=False, num_devices=1)
        state = estimator.init_state()
        device_batch = shard_batch(batch, estimator.mesh)
        compiled, compile_s = compile_timed(estimator.make_train_step(), state, device_batch)
        holder: dict[str, Any] = {"state": state}
        del state

        def run_window():
            state = holder["state"]
            for _ in range(window):
                state, metrics = compiled(state, device_batch)
            holder["state"], holder["metrics"] = state, metrics
            return state, metrics

        timing = interleaved_median(
            {"window": run_window}, budget_s=budget_s, min_reps=min_windows, max_reps=100
        )["window"]
        loss = float(holder["metrics"]["loss"])
        holder.clear()  # frees the state before the next model is built
    step_s = timing["median_s"] / window
    images = next(iter(batch.values())).shape[0]
    return {
        "batch": images,
        "step_s": step_s,
        "images_per_s": images / step_s,
        "compile_s": compile_s,
        "windows": timing["reps"],
        "steps_per_window": window,
        "xla_flops_per_step": cost_flops(compiled),
        "compiled_bytes": compiled_bytes(compiled),
        "final_loss": loss,
    }


def finite_positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- report


def _fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(section, figure, value, note) for the markdown table."""
    rows = []
    sections = result["sections"]
    for name, section in sections.items():
        if "skipped" in section:
            rows.append((name, "skipped", section["skipped"], ""))
            continue
        for row in section.get("rows", []):
            label, value, note = row["figure"], row["value"], row.get("note", "")
            rows.append((name, label, f"{_fmt(value)} {row['unit']}", note))
        for error in section.get("errors", []):
            rows.append((name, "error", error[:160].replace("|", "/"), ""))
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# Accelerator suite ({meta['device']})",
        "",
        f"Command: `{meta['command']}`; total {meta['total_s']:.0f} s "
        f"(sections: {', '.join(f'{k} {v:.0f} s' for k, v in meta['section_s'].items())}). "
        "Medians of interleaved repeats after a warm-up; compilation excluded. "
        "MFU = model FLOPs / time / dense peak of the compute dtype "
        f"({meta['peak_source']}).",
        "",
        "| section | figure | value | note |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {s} | {f} | {v} | {n} |" for s, f, v, n in summary_rows(result)]
    return "\n".join(lines) + "\n"
