"""MoE block benchmark: forward + backward time per dispatcher vs an equal-FLOPs dense MLP.

The V-MoE block of the issue: hidden 256, expert MLP 1024, 8 experts, top-2, capacity factor 1.0
(capacity = S * 2 / 8 exactly, so the experts do the same FLOPs per token as the dense MLP),
groups of 512 and 4096 tokens. Timed: one jitted ``value_and_grad`` of ``mean(y**2) + aux`` with
respect to all parameters and the input, for

* the dense MLP ``256 -> 2048 -> 256`` (2 x 1024 hidden = the same FLOPs per token);
* the MoE block (router + routing + dispatch + experts + combine) with each dispatcher:
  ``einsum`` (the reference's one-hot einsums, the baseline), ``indices`` (gathers) and
  ``ragged`` (dropless, ``jax.lax.ragged_dot``).

All variants run in this process, interleaved, on the same inputs; the fastest of ``--reps``
runs is reported with ratios to the dense MLP and to the einsum baseline. A second part times
the block with experts sharded over 1/2/4/8 devices (``jax.shard_map`` + ``all_to_all``) in a
subprocess with 8 fake CPU devices; on fake devices this measures overhead, not speed-up.

A third part (``--digits``) trains a small V-MoE on the bundled 8x8 digits and evaluates the
same weights with other routing settings (k and capacity factor at evaluation time), writing
moe.digits.json/.md and a PNG of test accuracy against the capacity factor.

Run: ``python benchmarks/moe.py`` (writes benchmarks/results/moe.json and moe.md);
``--quick`` for a short smoke run on fewer tokens; ``--digits`` for the routing sweep.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from flaxlab.nn.moe import MoeLayer, moe_mlp, routing_metrics, top_k_routing

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, MLP_DIM, EXPERTS, TOP_K, CAPACITY_FACTOR = 256, 1024, 8, 2, 1.0
DISPATCH_KINDS = ("einsum", "indices", "ragged")


def make_inputs(num_tokens, seed=0):
    keys = jax.random.split(jax.random.key(seed), 8)
    normal = lambda key, shape, fan_in: jax.random.normal(key, shape) / fan_in**0.5
    moe = {
        "fc1_kernel": normal(keys[0], (EXPERTS, HIDDEN, MLP_DIM), HIDDEN),
        "fc1_bias": jnp.zeros((EXPERTS, MLP_DIM)),
        "fc2_kernel": normal(keys[1], (EXPERTS, MLP_DIM, HIDDEN), MLP_DIM),
        "fc2_bias": jnp.zeros((EXPERTS, HIDDEN)),
        "router": normal(keys[2], (HIDDEN, EXPERTS), HIDDEN),
    }
    dense_hidden = TOP_K * MLP_DIM
    dense = {
        "fc1_kernel": normal(keys[3], (HIDDEN, dense_hidden), HIDDEN),
        "fc1_bias": jnp.zeros((dense_hidden,)),
        "fc2_kernel": normal(keys[4], (dense_hidden, HIDDEN), dense_hidden),
        "fc2_bias": jnp.zeros((HIDDEN,)),
    }
    x = jax.random.normal(keys[5], (num_tokens, HIDDEN))
    return moe, dense, x


def dense_loss(params, x):
    h = jax.nn.gelu(x @ params["fc1_kernel"] + params["fc1_bias"], approximate=True)
    y = h @ params["fc2_kernel"] + params["fc2_bias"]
    return jnp.mean(y**2)


def moe_loss(params, x, *, group_size, kind):
    groups = x.reshape(-1, group_size, HIDDEN)
    routing = top_k_routing(groups @ params["router"], TOP_K, capacity_factor=CAPACITY_FACTOR)
    experts = {k: v for k, v in params.items() if k != "router"}
    y = moe_mlp(experts, groups, routing, kind)
    aux = routing_metrics(routing, dropless=kind == "ragged")["auxiliary_loss"]
    return jnp.mean(y**2) + 0.01 * aux


def time_calls(fns, args, reps):
    """Fastest seconds per call of each jitted fn, runs interleaved (after one compile call).

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    for fn, a in zip(fns, args, strict=True):
        jax.block_until_ready(fn(*a))
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, (fn, a) in enumerate(zip(fns, args, strict=True)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def bench_dispatch(num_tokens, group_sizes, reps, kinds=DISPATCH_KINDS):
    """Rows of {group_size, variant, seconds, vs_dense, vs_einsum}."""
    moe, dense, x = make_inputs(num_tokens)
    grad = lambda loss: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    rows = []
    for group_size in group_sizes:
        variants = {"dense MLP (equal FLOPs)": (grad(dense_loss), (dense, x))}
        for kind in kinds:
            loss = functools.partial(moe_loss, group_size=group_size, kind=kind)
            variants[f"MoE {kind}"] = (grad(loss), (moe, x))
        names = list(variants)
        seconds = time_calls(
            [v[0] for v in variants.values()], [v[1] for v in variants.values()], reps
        )
        by_name = dict(zip(names, seconds, strict=True))
        for name, sec in by_name.items():
            rows.append(
                {
                    "group_size": group_size,
                    "variant": name,
                    "seconds": sec,
                    "vs_dense": sec / by_name["dense MLP (equal FLOPs)"],
                    "vs_einsum": sec / by_name["MoE einsum"] if "MoE einsum" in by_name else None,
                }
            )
    return rows


def bench_sharded(num_tokens, group_size, shard_counts, reps, kind="indices"):
    """Fwd+bwd seconds of MoeLayer with experts over 1/2/4/8 devices (needs >= 8 devices)."""
    x = jax.random.normal(jax.random.key(0), (num_tokens // group_size, group_size, HIDDEN))
    fns, args = [], []
    for shards in shard_counts:
        mesh = jax.make_mesh(
            (shards,),
            ("expert",),
            axis_types=(jax.sharding.AxisType.Auto,),
            devices=jax.devices()[:shards],
        )
        layer = MoeLayer(
            HIDDEN,
            MLP_DIM,
            EXPERTS,
            num_selected_experts=TOP_K,
            group_size=group_size,
            capacity_factor=CAPACITY_FACTOR,
            dispatch_kind=kind,
            mesh=mesh,
            rngs=__import__("flax").nnx.Rngs(0),
        )
        graphdef, state = __import__("flax").nnx.split(layer)

        def loss(state, x, graphdef=graphdef):
            y, aux = __import__("flax").nnx.merge(graphdef, state)(x)
            return jnp.mean(y**2) + 0.01 * aux["auxiliary_loss"]

        fns.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))))
        args.append((state, x))
    seconds = time_calls(fns, args, reps)
    base = seconds[0]
    return [
        {
            "expert_shards": n,
            "group_size": group_size,
            "dispatch": kind,
            "seconds": s,
            "vs_1_shard": s / base,
        }
        for n, s in zip(shard_counts, seconds, strict=True)
    ]


def run_sharded_subprocess(num_tokens, group_size, reps):
    code = (
        "import jax, json, sys; jax.config.update('jax_num_cpu_devices', 8); "
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import moe; "
        f"print('JSON' + json.dumps(moe.bench_sharded({num_tokens}, {group_size}, "
        f"(1, 2, 4, 8), {reps})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("JSON"))
    return json.loads(line[4:])


def digits_vmoe_config(num_experts=4, top_k=2):
    """V-MoE on 8x8 digits: patch 2 (16 tokens + class), width 96, 4 blocks, MoE in blocks 1, 3."""
    from flaxlab.models.vmoe import MoeConfig, VMoEConfig

    moe = MoeConfig(layers=(1, 3), num_experts=num_experts, num_selected_experts=top_k)
    return VMoEConfig(
        num_classes=10,
        image_size=(8, 8),
        num_channels=1,
        patch_size=(2, 2),
        hidden_size=96,
        num_layers=4,
        num_heads=4,
        mlp_dim=192,
        moe=moe,
    )


def digits_routing_sweep(
    steps, capacity_factors=(0.25, 0.5, 1.0, 1.05, 1.5, 2.0, 4.0), ks=(1, 2, 3)
):
    """Trains a digits V-MoE (k=2, capacity 1.05), then evaluates it with other k and capacity."""
    import optax
    from flax import nnx

    from flaxlab.data.factory import make_data
    from flaxlab.models.vmoe import VMoE
    from flaxlab.train.config import DataConfig

    model = VMoE(digits_vmoe_config(), rngs=nnx.Rngs(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(100, steps // 5), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train_batches, eval_iterator = make_data(
        DataConfig(name="digits", batch_size=128, eval_batch_size=360, crop_padding=1)
    )

    @nnx.jit
    def train_step(model, optimizer, images, labels, step):
        def loss_fn(model):
            key = jax.random.fold_in(jax.random.key(0), step)
            logits, aux = model(images, deterministic=False, rngs=nnx.Rngs(key))
            targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.1)
            return optax.softmax_cross_entropy(logits, targets).mean() + aux["aux_loss"]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    start = time.perf_counter()
    for step in range(steps):
        batch = train_batches(step)
        loss = train_step(model, optimizer, batch["image"], batch["label"], step)
    train_seconds = time.perf_counter() - start

    @functools.partial(nnx.jit, static_argnames=("k", "capacity_factor"))
    def evaluate(model, images, labels, mask, k, capacity_factor):
        logits, aux = model(images, num_selected_experts=k, capacity_factor=capacity_factor)
        correct = jnp.sum((logits.argmax(-1) == labels) * mask)
        dropped = (aux["moe1_dropped_fraction"] + aux["moe3_dropped_fraction"]) / 2
        return correct, dropped

    rows = []
    for k in ks:
        for cf in capacity_factors:
            correct = count = dropped = 0.0
            batches = 0
            for batch in eval_iterator():
                c, d = evaluate(model, batch["image"], batch["label"], batch["mask"], k, cf)
                correct += float(c)
                count += float(batch["mask"].sum())
                dropped += float(d)
                batches += 1
            rows.append(
                {
                    "k": k,
                    "capacity_factor": cf,
                    "accuracy": correct / count,
                    "dropped_fraction": dropped / batches,
                }
            )
    return {
        "steps": steps,
        "final_train_loss": float(loss),
        "train_seconds": train_seconds,
        "trained_with": {"k": 2, "capacity_factor": 1.05},
        "eval": rows,
    }


def plot_digits(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in sorted({r["k"] for r in result["eval"]}):
        rows = [r for r in result["eval"] if r["k"] == k]
        ax.plot(
            [r["capacity_factor"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            marker="o",
            label=f"k = {k} at evaluation",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("capacity factor at evaluation")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"V-MoE digits (trained k=2, C=1.05, {result['steps']} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def digits_markdown(result):
    lines = [
        f"# V-MoE digits: evaluation-time routing ({result['device']})",
        "",
        f"Trained {result['steps']} steps with k=2, capacity factor 1.05 "
        f"({result['train_seconds']:.0f} s); the same weights evaluated on the 360 test digits "
        f"with other k / capacity factors. Command: `{result['command']}`",
        "",
        "| k | capacity factor | test accuracy | dropped assignments |",
        "|---:|---:|---:|---:|",
    ]
    for r in result["eval"]:
        lines.append(
            f"| {r['k']} | {r['capacity_factor']} | {100 * r['accuracy']:.1f}% | "
            f"{100 * r['dropped_fraction']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def markdown(result):
    lines = [
        f"# MoE block benchmark ({result['device']})",
        "",
        f"hidden {HIDDEN}, expert MLP {MLP_DIM}, {EXPERTS} experts, top-{TOP_K}, capacity factor "
        f"{CAPACITY_FACTOR}; {result['num_tokens']} tokens; forward + backward, fastest of "
        f"{result['reps']} runs. Command: `{result['command']}`"
        + (
            f" (load average {result['load_average_at_start']:.1f} at the start)"
            if "load_average_at_start" in result
            else ""
        ),
        "",
        "Variants are interleaved run by run; compare ratios within a group size (other jobs on a "
        "shared machine move absolute times between sections).",
        "",
        "| group size | variant | ms | vs dense | vs einsum |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["dispatch"]:
        vs_einsum = "" if r["vs_einsum"] is None else f"{r['vs_einsum']:.2f}x"
        lines.append(
            f"| {r['group_size']} | {r['variant']} | {1e3 * r['seconds']:.1f} | "
            f"{r['vs_dense']:.2f}x | {vs_einsum} |"
        )
    if result.get("sharded"):
        lines += [
            "",
            "Expert parallelism on fake CPU devices (one process, 8 host devices "
            "sharing the same cores: overhead, not speed-up):",
            "",
            "| expert shards | group size | dispatch | ms | vs 1 shard |",
            "|---:|---:|---|---:|---:|",
        ]
        for r in result["sharded"]:
            lines.append(
                f"| {r['expert_shards']} | {r['group_size']} | {r['dispatch']} | "
                f"{1e3 * r['seconds']:.1f} | {r['vs_1_shard']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on fewer tokens")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-sharded", action="store_true", help="skip the fake-device part")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--digits", action="store_true", help="only the digits V-MoE evaluation-time routing sweep"
    )
    parser.add_argument("--steps", type=int, default=1000, help="digits training steps")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.digits:
        steps = 20 if args.quick else args.steps
        result = digits_routing_sweep(steps)
        result["device"] = f"{jax.devices()[0].device_kind} ({platform.machine()})"
        result["command"] = f"python benchmarks/moe.py --digits --steps {steps}"
        stem = "moe.digits.quick" if args.quick else "moe.digits"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(digits_markdown(result))
        plot_digits(result, args.out / f"{stem}.png")
        print(digits_markdown(result))
        return
    num_tokens = args.tokens or (2048 if args.quick else 4096)
    reps = args.reps or (2 if args.quick else 7)
    group_sizes = (512,) if args.quick else (512, 4096)
    result = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()})",
        "jax": jax.__version__,
        "command": "python benchmarks/moe.py" + (" --quick" if args.quick else ""),
        "num_tokens": num_tokens,
        "reps": reps,
        "load_average_at_start": os.getloadavg()[0],
        "dispatch": bench_dispatch(num_tokens, group_sizes, reps),
    }
    if not args.no_sharded:
        result["sharded"] = run_sharded_subprocess(num_tokens, 512, reps)
    stem = "moe.quick" if args.quick else "moe"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
