"""Every accelerator figure flaxlab tracks, in one run of at most 8 minutes on one H200.

Sections (each with a time budget for its measurements; compilation is timed separately and
excluded from every figure; medians of interleaved repeats after a warm-up):

* ``vit``: ViT-B/16 training images/s at 224 px, batch 128, bfloat16 and float32 compute, through
  the estimator's jitted, donated train step (AdamW, global-norm clipping), with MFU from the
  analytic model FLOPs (``gpu_suite_parts.vit_forward_flops`` x 3) and XLA's own count.
* ``vdm``: the ``vdm-cifar10`` preset (32 ResNet blocks x 128 channels, EMA) at batch 128.
* ``favor``: causal FAVOR+ (``flaxlab.nn.favor.favor_attention``, 256 features) forward +
  backward at 16k and 64k tokens (batch 1, 8 heads, head dim 64, bfloat16 inputs) against
  ``jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")``.
* ``amos``: one jitted update (``tx.update`` + ``apply_updates``, donated) of
  ``flaxlab.optim.amos`` (factored slots, momentum 0.9, clip 1) vs ``optax.adamw`` on the
  BERT-base tree of benchmarks/amos.py (token embeddings 30522 x 768, 12 layers of q/k/v/o,
  768 x 3072 and 3072 x 768 MLPs, layer norms, biases; plus position/segment embeddings and the
  MLM head: 110M parameters).
* ``moe``: the V-MoE block of benchmarks/moe.py (hidden 256, experts 8 x 1024, top-2, capacity
  factor 1) forward + backward with 4096 tokens per group through each dispatcher; the fastest
  against the dense MLP of equal FLOPs (256 -> 2048 -> 256).
* ``mfu``: achieved TFLOP/s and MFU of every timed program whose FLOPs are known.

    python benchmarks/gpu_suite.py            # on the accelerator: benchmarks/results/gpu_suite.*
    python benchmarks/gpu_suite.py --tiny     # same code paths, tiny sizes, CPU, < 1 minute

``--tiny`` writes gpu_suite.tiny.json/.md (and lowers XLA's CPU optimisation level: compiling
is most of a tiny run); ``--out PREFIX`` writes PREFIX.json and PREFIX.md.
On CPU the exact-attention baseline uses XLA's implementation and MFU is not reported (no
peak). A section that fails records its error and the others still run; the results are
rewritten after every section, a section whose expected time would take the run past 7 minutes
is skipped, and a watchdog ends the run at 470 s whatever is running.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gpu_suite_parts as parts

RESULTS = Path(__file__).resolve().parent / "results"
# Measurement budgets in seconds per section (compilation and set-up come on top), and the
# expected whole-section time on an H200 (compilation included). The run must stay under 8
# minutes: a section whose expected time would take the run past LIMIT_S is skipped.
BUDGETS = {"vit": 24.0, "vdm": 15.0, "favor": 16.0, "amos": 6.0, "moe": 8.0}
EXPECTED_S = {"vit": 150.0, "favor": 60.0, "amos": 25.0, "moe": 45.0, "vdm": 120.0}
LIMIT_S = 420.0
# A watchdog ends the run here whatever a section is doing (e.g. compiling), keeping what the
# finished sections wrote.
HARD_STOP_S = 470.0
TINY_BUDGETS = {"vit": 1.0, "vdm": 1.0, "favor": 1.0, "amos": 0.5, "moe": 1.0}
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@dataclasses.dataclass(frozen=True)
class Sizes:
    image_size: int = 224
    vit_batch: int = 128
    vit_overrides: tuple = ()
    vdm_batch: int = 128
    vdm_overrides: tuple = ()
    favor_lengths: tuple = (16384, 65536)
    bert: str = "base"
    moe_group: int = 4096
    moe_groups: int = 8
    window: int = 10
    min_reps: int = 5


TINY = Sizes(
    image_size=32,
    vit_batch=8,
    vit_overrides=(("num_layers", 1), ("hidden_size", 32), ("num_heads", 2), ("mlp_dim", 64)),
    vdm_batch=8,
    vdm_overrides=("model.depth=1", "model.width=16", "model.groups=8", "model.image_shape=8,8,3"),
    favor_lengths=(128, 256),
    bert="toy",
    moe_group=256,
    moe_groups=1,
    window=2,
    min_reps=2,
)


def row(figure, value, unit, note="", **extra):
    return {"figure": figure, "value": value, "unit": unit, "note": note, **extra}


# ----------------------------------------------------------------------------- sections


def section_vit(sizes: Sizes, budget: float):
    from flaxlab.models import ViTConfig
    from flaxlab.train import DataConfig, ExperimentConfig, TrainConfig

    rng = np.random.default_rng(0)
    size, batch = sizes.image_size, sizes.vit_batch
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, batch).astype(np.int32)
    details, rows, errors = [], [], []
    for dtype in ("bfloat16", "float32"):
        model = ViTConfig.variant(
            "B/16", num_classes=1000, image_size=size, dtype=dtype, **dict(sizes.vit_overrides)
        )
        config = ExperimentConfig(
            family="vit",
            model=model,
            data=DataConfig(batch_size=batch),
            optimizer=parts.adamw_config(),
            train=TrainConfig(steps=10**6),
        )
        try:
            out = parts.train_throughput(
                config,
                {"image": images, "label": labels},
                budget_s=budget / 2,
                window=sizes.window,
                min_windows=sizes.min_reps,
            )
        except Exception as error:  # keep the other dtype's figure
            errors.append(f"{dtype}: {type(error).__name__}: {str(error)[:300]}")
            continue
        out["dtype"] = dtype
        out["model_flops_per_step"] = 3 * batch * parts.vit_forward_flops(model)
        details.append(out)
        name = f"ViT-B/16 {size}px {dtype}" + (" (tiny dims)" if sizes.vit_overrides else "")
        note = f"batch {batch}, step {out['step_s'] * 1e3:.1f} ms, compile {out['compile_s']:.0f} s"
        rows.append(row(f"{name} training", out["images_per_s"], "images/s", note))
    return {"details": details, "rows": rows, "errors": errors}


def section_vdm(sizes: Sizes, budget: float):
    from flaxlab.configs import get_preset

    overrides = [f"data.batch_size={sizes.vdm_batch}", *sizes.vdm_overrides]
    config = get_preset("vdm-cifar10", overrides)
    h, w, c = config.model.image_shape
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (sizes.vdm_batch, h, w, c))
    batch = {
        "image": (pixels / 127.5 - 1.0).astype(np.float32),
        "label": np.zeros(sizes.vdm_batch, np.int32),
    }
    out = parts.train_throughput(
        config, batch, budget_s=budget, window=sizes.window, min_windows=sizes.min_reps
    )
    out.update(preset="vdm-cifar10", overrides=overrides, dtype=config.model.dtype)
    note = (
        f"batch {sizes.vdm_batch}, {h}x{w} px, {config.model.depth} blocks x "
        f"{config.model.width} ch, {config.model.dtype}, step {out['step_s'] * 1e3:.1f} ms"
    )
    rows = [row("VDM CIFAR-10 training", out["images_per_s"], "images/s", note)]
    return {"details": [out], "rows": rows, "errors": []}


def section_favor(sizes: Sizes, budget: float):
    from flaxlab.nn.favor import default_implementation, favor_attention
    from flaxlab.nn.favor import gaussian_orthogonal_random_matrix as orthogonal_matrix

    heads, dim, features = 8, 64, 256
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    projection = orthogonal_matrix(jax.random.key(0), features, dim)
    fns = {
        "favor_causal": lambda q, k, v: favor_attention(q, k, v, projection, causal=True),
        "exact_causal": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation
        ),
    }
    details, rows, errors = [], [], []
    for length in sizes.favor_lengths:
        keys = jax.random.split(jax.random.key(length), 4)
        q, k, v = (
            (0.5 * jax.random.normal(key, (1, length, heads, dim))).astype(jnp.bfloat16)
            for key in keys[:3]
        )
        probe = jax.random.normal(keys[3], (1, length, heads, dim), jnp.float32)
        variants = {}
        for name, fn in fns.items():

            def loss(q, k, v, probe, fn=fn):
                return jnp.sum(fn(q, k, v).astype(jnp.float32) * probe)

            variants[name] = (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v, probe))
        calls, info, failed = parts.compile_all(variants)
        errors += [f"L={length} {e}" for e in failed]
        timing = parts.interleaved_median(
            calls, budget_s=budget / len(sizes.favor_lengths), min_reps=sizes.min_reps
        )
        # Model FLOPs (fwd + bwd = 3 x fwd): exact causal attention 2 matmuls over the L^2 / 2
        # causal pairs (cuDNN's fused kernel is a custom call XLA does not count); FAVOR+ the
        # q/k feature maps (2 x 2 L D M) and the prefix sums of k'[v 1] read by q' (2 x 2 L M
        # (D + 1)), per head, without the chunked form's masked intra-chunk blocks.
        model_flops = {
            "exact_causal": 3 * heads * 4 * length * length * dim / 2,
            "favor_causal": 3 * heads * 4 * length * features * (2 * dim + 1),
        }
        for name, t in timing.items():
            compiled, compile_s = info[name]
            exact = name == "exact_causal"
            details.append(
                dict(
                    method=name,
                    length=length,
                    seconds=t["median_s"],
                    reps=t["reps"],
                    compile_s=compile_s,
                    flops=model_flops[name],
                    xla_flops=parts.cost_flops(compiled),
                    compiled_bytes=parts.compiled_bytes(compiled),
                    # FAVOR+ computes in float32 whatever its inputs (flaxlab.nn.favor).
                    dtype="bfloat16" if exact else "float32",
                    implementation=(implementation or "xla") if exact else default_implementation(),
                )
            )
        for name, label in (("favor_causal", "FAVOR+ causal"), ("exact_causal", "exact causal")):
            if name in timing:
                ms = timing[name]["median_s"] * 1e3
                rows.append(row(f"{label} fwd+bwd L={length}", ms, "ms", "batch 1, 8 heads"))
        if len(timing) == 2:
            ratio = timing["favor_causal"]["median_s"] / timing["exact_causal"]["median_s"]
            exact = implementation or "xla"
            rows.append(row(f"FAVOR+ / exact ({exact}) L={length}", ratio, "x", "time ratio"))
    return {"details": details, "rows": rows, "errors": errors}


def section_amos(sizes: Sizes, budget: float):
    import amos as amos_bench

    shapes = amos_bench.bert_shapes(*amos_bench.SIZES[sizes.bert])
    structs = amos_bench.as_structs(shapes)
    leaves, treedef = jax.tree.flatten(structs)
    keys = jax.random.split(jax.random.key(0), 2 * len(leaves))
    make = lambda key, s: 0.02 * jax.random.normal(key, s.shape, s.dtype)
    params0 = jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys[::2], leaves)])
    grads = jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys[1::2], leaves)])
    optimizers = {"adamw": amos_bench.adamw(), "amos": amos_bench.amos_default(0.9, 1.0)}
    calls, compile_s = {}, {}
    for name, tx in optimizers.items():
        params = jax.tree.map(jnp.copy, params0)
        holder = {"state": (params, tx.init(params))}
        step = amos_bench.make_step(tx)
        compiled, compile_s[name] = parts.compile_timed(step, *holder["state"], grads)

        def call(holder=holder, compiled=compiled):
            holder["state"] = compiled(*holder["state"], grads)
            return holder["state"]

        calls[name] = call
    timing = parts.interleaved_median(
        calls, budget_s=budget, min_reps=max(sizes.min_reps, 5), max_reps=200, warmup=3
    )
    count = amos_bench.count_params(structs)
    ratio = timing["amos"]["median_s"] / timing["adamw"]["median_s"]
    details = [
        dict(optimizer=name, seconds=t["median_s"], reps=t["reps"], compile_s=compile_s[name])
        for name, t in timing.items()
    ]
    tree = f"BERT-{sizes.bert} tree, {count / 1e6:.1f}M parameters"
    rows = [
        row("AdamW update", timing["adamw"]["median_s"] * 1e3, "ms", tree),
        row("Amos update", timing["amos"]["median_s"] * 1e3, "ms", tree),
        row("Amos / AdamW update time", ratio, "x", "factored slots, momentum 0.9, clip 1"),
    ]
    return {"details": details, "rows": rows, "errors": [], "parameters": count}


def section_moe(sizes: Sizes, budget: float):
    import moe as moe_bench

    tokens = sizes.moe_group * sizes.moe_groups
    moe_params, dense_params, x = moe_bench.make_inputs(tokens)
    grad = lambda loss: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    variants = {"dense": (grad(moe_bench.dense_loss), (dense_params, x))}
    for kind in moe_bench.DISPATCH_KINDS:
        loss = functools.partial(moe_bench.moe_loss, group_size=sizes.moe_group, kind=kind)
        variants[kind] = (grad(loss), (moe_params, x))
    calls, info, errors = parts.compile_all(variants)
    timing = parts.interleaved_median(calls, budget_s=budget, min_reps=sizes.min_reps)
    details = [
        dict(
            variant=name,
            seconds=t["median_s"],
            reps=t["reps"],
            compile_s=info[name][1],
            xla_flops=parts.cost_flops(info[name][0]),
            dtype="float32",
        )
        for name, t in timing.items()
    ]
    shape = f"{sizes.moe_groups} x {sizes.moe_group} tokens"
    rows = []
    kinds = [k for k in moe_bench.DISPATCH_KINDS if k in timing]
    if "dense" in timing and kinds:
        best = min(kinds, key=lambda k: timing[k]["median_s"])
        dense_ms, best_ms = (timing[k]["median_s"] * 1e3 for k in ("dense", best))
        rows = [
            row("dense MLP (equal FLOPs) fwd+bwd", dense_ms, "ms", shape),
            row(f"MoE best dispatch ({best}) fwd+bwd", best_ms, "ms", shape),
            row(f"MoE {best} / dense", best_ms / dense_ms, "x", f"of {', '.join(kinds)}"),
        ]
    return {"details": details, "rows": rows, "errors": errors}


def section_mfu(result, peaks):
    """Achieved TFLOP/s and MFU of the timed programs whose FLOPs are known."""
    items = []
    sections = result["sections"]
    for d in sections.get("vit", {}).get("details", []):
        name = f"ViT-B/16 {d['dtype']} train step"
        items.append((name, d["model_flops_per_step"], "analytic", d["step_s"], d["dtype"]))
    for d in sections.get("vdm", {}).get("details", []):
        items.append(("VDM train step", d["xla_flops_per_step"], "xla", d["step_s"], d["dtype"]))
    for d in sections.get("favor", {}).get("details", []):
        name = f"{d['method']} L={d['length']} fwd+bwd"
        items.append((name, d["flops"], "analytic", d["seconds"], d["dtype"]))
    # The MoE block does the dense MLP's FLOPs per token by construction (capacity factor 1):
    # its model FLOPs are XLA's count for the dense MLP (dispatch einsums are overhead).
    moe_details = sections.get("moe", {}).get("details", [])
    dense_flops = next((d["xla_flops"] for d in moe_details if d["variant"] == "dense"), None)
    for d in moe_details:
        name = f"MoE {d['variant']} fwd+bwd"
        items.append((name, dense_flops, "xla (dense MLP)", d["seconds"], d["dtype"]))
    details, rows = [], []
    for name, flops, source, seconds, dtype in items:
        if not flops:
            continue
        entry = dict(name=name, flops=flops, flops_source=source, seconds=seconds, dtype=dtype)
        entry["tflops_per_s"] = flops / seconds / 1e12
        rows.append(row(f"{name} achieved", entry["tflops_per_s"], "TFLOP/s", f"{source} FLOPs"))
        for peak_name in (dtype, "tf32") if dtype == "float32" else (dtype,):
            if peaks:  # float32 matmuls run on TF32 tensor cores by default on GPUs
                value = flops / seconds / peaks[peak_name]
                entry[f"mfu_vs_{peak_name}"] = value
                rows.append(row(f"{name} MFU", 100 * value, "%", f"vs {peak_name} peak"))
        details.append(entry)
    return {"details": details, "rows": rows, "errors": []}


SECTIONS = {
    "vit": section_vit,
    "favor": section_favor,
    "amos": section_amos,
    "moe": section_moe,
    "vdm": section_vdm,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: CPU smoke run")
    parser.add_argument("--out", type=Path, help="output prefix (default results/gpu_suite)")
    parser.add_argument("--sections", type=str, help=f"comma-separated subset of {list(SECTIONS)}")
    args = parser.parse_args(argv)
    if args.tiny:
        # Compilation dominates a tiny run: XLA's cheaper CPU code generation (read when the
        # backend starts, i.e. at the first computation below) halves it; code paths unchanged.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {TINY_XLA_FLAGS}".strip()
    start = time.perf_counter()
    sizes, budgets = (TINY, TINY_BUDGETS) if args.tiny else (Sizes(), BUDGETS)
    chosen = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown --sections {unknown}; accepted: {list(SECTIONS)}")
    prefix = args.out or RESULTS / ("gpu_suite.tiny" if args.tiny else "gpu_suite")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    peaks = parts.device_peaks()
    command = " ".join(
        ["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
    )
    result = {
        "meta": {
            "command": command,
            "device": parts.describe_device(),
            "backend": jax.default_backend(),
            "tiny": args.tiny,
            "peak_flops": peaks,
            "peak_source": "NVIDIA product pages, dense" if peaks else "no peak known: no MFU",
            "budgets_s": budgets,
            "section_s": {},
        },
        "sections": {},
    }

    lock = threading.Lock()

    def write():
        with lock:
            result["meta"]["total_s"] = time.perf_counter() - start
            Path(f"{prefix}.json").write_text(json.dumps(result, indent=1) + "\n")
            Path(f"{prefix}.md").write_text(parts.markdown(result))

    running: list[str] = []

    def hard_stop():
        section = running[-1] if running else "?"
        result["sections"][section] = {"rows": [], "errors": [f"stopped at {HARD_STOP_S:.0f} s"]}
        try:  # the main thread may be between two updates of `result`
            result["sections"]["mfu"] = section_mfu(result, peaks)
            write()
        except Exception as error:
            print(f"could not write the partial results: {error!r}", flush=True)
        print(f"[{section}] stopped: the run reached {HARD_STOP_S:.0f} s", flush=True)
        os._exit(2)

    watchdog = threading.Timer(HARD_STOP_S, hard_stop)
    watchdog.daemon = True
    if not args.tiny:
        watchdog.start()

    for name in chosen:
        t0 = time.perf_counter()
        if not args.tiny and t0 - start + EXPECTED_S[name] > LIMIT_S:
            result["sections"][name] = {
                "skipped": f"{t0 - start:.0f} s used; {EXPECTED_S[name]:.0f} s more would pass "
                f"the {LIMIT_S:.0f} s limit"
            }
            continue
        running.append(name)
        try:
            section = SECTIONS[name](sizes, budgets[name])
        except Exception as error:
            section = {"errors": [f"{type(error).__name__}: {str(error)[:500]}"], "rows": []}
        section["wall_s"] = time.perf_counter() - t0
        result["sections"][name] = section
        result["meta"]["section_s"][name] = section["wall_s"]
        print(f"[{name}] {section['wall_s']:.1f} s", flush=True)
        for r in section["rows"]:
            print(f"  {r['figure']}: {r['value']:.4g} {r['unit']}  {r['note']}", flush=True)
        for error in section["errors"]:
            print(f"  error: {error}", flush=True)
        write()
    watchdog.cancel()
    result["sections"]["mfu"] = section_mfu(result, peaks)
    write()
    print(parts.markdown(result))
    return 1 if any(s.get("errors") for s in result["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
