"""Step time, per-device memory and loss agreement of ViT-B/16 and V-MoE-B/16 across layouts.

Runs the estimator's own train step (``Estimator.make_train_step``: the jitted, donated step
with the mesh's parameter, optimizer-slot and batch shardings from
``flaxlab.train.sharding``) on 1, 2, 4 and 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``) in each layout:

* ``data``: every device on the ``data`` axis (parameters replicated);
* ``fsdp``: every device on ``fsdp`` (batch split, parameters and slots split);
* ``model``: every device on ``model`` (tensor parallelism: heads and MLP units split);
* ``expert`` (V-MoE only): every device on ``expert`` (experts split, batch split);
* ``mixed``: two or three axes at once (4 and 8 devices).

On a CPU the devices share the same cores, so this is a correctness-and-overhead check, not a
speed-up: images are 64 px (4 x 4 patches + class token = 17 tokens) while width, depth, heads
and MLP keep the B/16 sizes (V-MoE: 8 experts, top-2, MoE in the last 2 blocks), batch 8,
AdamW with global-norm clipping. Every layout starts from the same parameters (initialised once
on one device, then placed with the layout's shardings) and trains on the same batch; the
losses of its first two steps (the second after one update) are compared with one device's.

Per-device memory: XLA's ``memory_analysis()`` of the compiled step (argument + output + temp
bytes, and the same with donated outputs counted once), and the bytes of the parameters and
optimizer state held by the busiest device (``addressable_shards``). A layout whose predicted
host memory (devices x per-device peak) exceeds ``--max-host-gib`` (or 60% of the memory
available at the start) is compiled and measured but not run.

    python benchmarks/scaling.py               # ~20 min on one core: results/scaling.json, .md
    python benchmarks/scaling.py --tiny        # narrow models, a minute: results/scaling.tiny.*
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # must precede the first use of jax
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import gpu_suite_parts as parts  # noqa: E402
from flaxlab.models import ViTConfig  # noqa: E402
from flaxlab.models.vmoe import MoeConfig, VMoEConfig  # noqa: E402
from flaxlab.train import DataConfig, Estimator, ExperimentConfig, TrainConfig  # noqa: E402
from flaxlab.train.sharding import MeshConfig, shard_batch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
# Loss agreement with one device: float32 sums in another order differ by ~1e-7 relative.
RTOL = 1e-4
TINY_DIMS = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128)


def model_configs(image_size: int, tiny: bool) -> dict[str, tuple[str, Any]]:
    dims: dict[str, Any] = dict(TINY_DIMS) if tiny else {}
    vmoe_dims = dims
    if tiny:  # narrow models keep two MoE blocks (of two)
        moe = MoeConfig(layers=(0, 1), num_experts=8, num_selected_experts=2)
        vmoe_dims = dict(dims, representation_size=dims["hidden_size"], moe=moe)
    vit = ViTConfig.variant("B/16", num_classes=10, image_size=image_size, **dims)
    vmoe = VMoEConfig.variant(
        "B/16",
        moe_layers="last2",
        num_experts=8,
        num_selected_experts=2,
        num_classes=10,
        image_size=image_size,
        **vmoe_dims,
    )
    return {"ViT-B/16": ("vit", vit), "V-MoE-B/16": ("vmoe", vmoe)}


def layouts(family: str, devices: int) -> dict[str, MeshConfig]:
    """Layout name -> mesh on ``devices`` devices (one ``single`` layout on one device)."""
    if devices == 1:
        return {"single": MeshConfig()}
    out = {
        "data": MeshConfig(data=devices),
        "fsdp": MeshConfig(data=1, fsdp=devices),
        "model": MeshConfig(data=1, model=devices),
    }
    if family == "vmoe":
        out["expert"] = MeshConfig(data=1, expert=devices)
    if devices == 4:
        out["mixed"] = (
            MeshConfig(data=1, expert=2, model=2)
            if family == "vmoe"
            else MeshConfig(data=1, fsdp=2, model=2)
        )
    if devices == 8:
        out["mixed"] = (
            MeshConfig(data=1, fsdp=2, model=2, expert=2)
            if family == "vmoe"
            else MeshConfig(data=2, fsdp=2, model=2)
        )
    return out


def experiment(family, model, mesh: MeshConfig, batch: int) -> ExperimentConfig:
    return ExperimentConfig(
        family=family,
        model=model,
        data=DataConfig(batch_size=batch),
        optimizer=parts.adamw_config(),
        train=TrainConfig(steps=1000),
        mesh=mesh,
    )


def per_device_bytes(tree) -> dict[int, int]:
    """Bytes of ``tree``'s arrays held by each device (its addressable shards)."""
    held: dict[int, int] = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] += shard.data.nbytes
    return dict(held)


def host_memory_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (a large number where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**50


def measure(family, model, mesh, devices, host_state, batch, *, timed_steps, host_limit):
    """One layout: compile, memory figures, two loss steps and ``timed_steps`` timed steps."""
    config = experiment(family, model, mesh, next(iter(batch.values())).shape[0])
    with tempfile.TemporaryDirectory() as tmp:
        estimator = Estimator(config, Path(tmp) / "run", progress=False, num_devices=devices)
    row: dict[str, Any] = {"mesh": {k: v for k, v in estimator.mesh.shape.items() if v > 1}}
    state = jax.device_put(host_state, estimator.shardings)
    device_batch = shard_batch(batch, estimator.mesh)
    start = time.perf_counter()
    compiled = estimator.make_train_step().lower(state, device_batch).compile()
    row["compile_s"] = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is not None:
        arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
        alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
        row.update(argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp)
        row["compiled_total_bytes"] = arg + out + temp
        row["compiled_peak_bytes"] = arg + out - alias + temp
    params, slots = (per_device_bytes(state[k]) for k in ("params", "opt_state"))
    row["params_bytes_max_device"] = max(params.values())
    row["opt_state_bytes_max_device"] = max(slots.values())
    row["params_bytes_total"] = sum(params.values())
    predicted = devices * row.get("compiled_peak_bytes", 0)
    row["predicted_host_bytes"] = predicted
    if predicted > host_limit:
        row["status"] = (
            f"not run: {devices} devices x {row['compiled_peak_bytes'] / 2**30:.2f} GiB = "
            f"{predicted / 2**30:.1f} GiB > host limit {host_limit / 2**30:.1f} GiB"
        )
        return row
    losses, wall, cpu = [], [], []
    for step in range(2 + timed_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready((state, metrics))
        if step >= 2:  # the first two steps (loss checks) are the warm-up
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        else:
            losses.append(float(metrics["loss"]))
    row.update(
        loss_step1=losses[0],
        loss_step2=losses[1],
        step_s=statistics.median(wall),
        step_cpu_s=statistics.median(cpu),
        status="ok",
    )
    del state
    return row


def initial_state(family, model, batch_size):
    """The training state initialised on one device, as host arrays."""
    config = experiment(family, model, MeshConfig(), batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        estimator = Estimator(config, Path(tmp) / "run", progress=False, num_devices=1)
    return jax.device_get(estimator.init_state())


def compare(row, reference):
    for step in (1, 2):
        key = f"loss_step{step}"
        if key in row and key in reference:
            diff = abs(row[key] - reference[key]) / abs(reference[key])
            row[f"rel_diff_step{step}"] = diff
    diffs = [row[k] for k in ("rel_diff_step1", "rel_diff_step2") if k in row]
    if diffs:
        row["loss_matches_1_device"] = max(diffs) <= RTOL


def markdown(result) -> str:
    meta = result["meta"]
    lines = [
        f"# Layouts on fake CPU devices ({meta['device']})",
        "",
        f"Command: `{meta['command']}`; {meta['wall_s'] / 60:.1f} min. {meta['note']}",
        "",
        "Step times: median of the timed steps after 2 warm-up steps; CPU s = process CPU time "
        "per step (all fake devices share the same core(s), so compare layouts, not speed-ups). "
        "Compiled MiB: the per-device step program's argument + output + temp bytes "
        "(donated outputs counted once in brackets). Params / slots MiB: held by the busiest "
        f"device. Loss rel. diff: vs one device at step 1 and at step 2 (after one update); "
        f"match = both <= {RTOL:g}.",
    ]
    for name in meta["parameters"]:
        lines += [
            "",
            f"## {name} ({meta['parameters'][name] / 1e6:.1f}M parameters)",
            "",
            "| devices | layout | mesh | step s | CPU s | compile s | compiled MiB | "
            "temp MiB | params MiB | slots MiB | loss step 1 | loss step 2 | rel. diff 1 / 2 "
            "| status |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in (r for r in result["rows"] if r["model"] == name):
            mesh = " ".join(f"{k}={v}" for k, v in r.get("mesh", {}).items()) or "-"
            mib = lambda key, r=r: f"{r[key] / MiB:.1f}" if key in r else ""
            num = lambda key, fmt, r=r: format(r[key], fmt) if key in r else ""
            compiled = f"{mib('compiled_total_bytes')} ({mib('compiled_peak_bytes')})"
            diffs = (
                f"{r['rel_diff_step1']:.1e} / {r['rel_diff_step2']:.1e}"
                if "rel_diff_step2" in r
                else ""
            )
            status = r["status"]
            if status == "ok" and "loss_matches_1_device" in r:
                status = "ok, match" if r["loss_matches_1_device"] else "ok, MISMATCH"
            lines.append(
                f"| {r['devices']} | {r['layout']} | {mesh} | {num('step_s', '.2f')} | "
                f"{num('step_cpu_s', '.2f')} | {num('compile_s', '.0f')} | {compiled} | "
                f"{mib('temp_bytes')} | {mib('params_bytes_max_device')} | "
                f"{mib('opt_state_bytes_max_device')} | {num('loss_step1', '.6f')} | "
                f"{num('loss_step2', '.6f')} | {diffs} | {status} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="narrow models (smoke run)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--devices", type=str, default="1,2,4,8")
    parser.add_argument("--models", type=str, default="ViT-B/16,V-MoE-B/16")
    parser.add_argument("--max-host-gib", type=float, default=12.0)
    parser.add_argument("--out", type=Path, help="output prefix (default results/scaling)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = [int(n) for n in args.devices.split(",")]
    if max(counts) > jax.device_count():
        parser.error(f"--devices {counts}: only {jax.device_count()} devices")
    host_limit = int(min(args.max_host_gib * 2**30, 0.6 * host_memory_available()))
    configs = model_configs(args.image_size, args.tiny)
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - set(configs))
    if unknown:
        parser.error(f"unknown --models {unknown}; accepted: {sorted(configs)}")
    prefix = args.out or RESULTS / ("scaling.tiny" if args.tiny else "scaling")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    size = args.image_size
    batch = {
        "image": rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 10, args.batch).astype(np.int32),
    }
    tokens = (size // 16) ** 2 + 1
    dims = "narrow test dims " + str(TINY_DIMS) if args.tiny else "B/16 width, depth, heads, MLP"
    given = sys.argv[1:] if argv is None else argv
    result = {
        "meta": {
            "command": " ".join(["python benchmarks/scaling.py", *given]),
            "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} fake devices, "
            f"jax {jax.__version__}, {platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} usable core(s)",
            "note": f"Reduced image size {size} px ({tokens} tokens) with {dims}; batch "
            f"{args.batch}; AdamW + clipping; V-MoE: 8 experts, top-2, capacity factor 1.05, "
            f"MoE in blocks {list(configs['V-MoE-B/16'][1].moe.layers)} ('last2').",
            "image_size": size,
            "batch": args.batch,
            "host_limit_bytes": host_limit,
            "models": chosen,
            "parameters": {},
            "rtol": RTOL,
        },
        "rows": [],
    }

    def write():
        result["meta"]["wall_s"] = time.perf_counter() - start
        Path(f"{prefix}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{prefix}.md").write_text(markdown(result))

    for name in chosen:
        family, model = configs[name]
        host_state = initial_state(family, model, args.batch)
        count = sum(int(np.size(x)) for x in jax.tree.leaves(host_state["params"]))
        result["meta"]["parameters"][name] = count
        reference = None
        for devices in counts:
            for layout, mesh in layouts(family, devices).items():
                row: dict[str, Any] = {"model": name, "devices": devices, "layout": layout}
                try:
                    row.update(
                        measure(
                            family,
                            model,
                            mesh,
                            devices,
                            host_state,
                            batch,
                            timed_steps=args.timed_steps,
                            host_limit=host_limit,
                        )
                    )
                except Exception as error:  # a layout that fails is a finding: record it
                    row["status"] = f"error: {type(error).__name__}: {str(error)[:400]}"
                if devices == 1 and "loss_step2" in row:
                    reference = row
                if reference is not None:
                    compare(row, reference)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                write()
        del host_state
    write()
    print(markdown(result))
    bad = [
        r
        for r in result["rows"]
        if r["status"].startswith("error") or not r.get("loss_matches_1_device", True)
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
