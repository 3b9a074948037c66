"""MoE block benchmark: forward + backward time per dispatcher vs an equal-FLOPs dense MLP.

The V-MoE block of the issue: hidden 256, expert MLP 1024, 8 experts, top-2, capacity factor 1.0
(capacity = S * 2 / 8 exactly, so the experts do the same FLOPs per token as the dense MLP),
groups of 512 and 4096 tokens. Timed: one jitted ``value_and_grad`` of ``mean(y**2) + aux`` with
respect to all parameters and the input, for

* the dense MLP ``256 -> 2048 -> 256`` (2 x 1024 hidden = the same FLOPs per token);
* the MoE block (router + routing + dispatch + experts + combine) with each dispatcher:
  ``einsum`` (the reference's one-hot einsums, the baseline), ``indices`` (gathers) and
  ``ragged`` (dropless, ``jax.lax.ragged_dot``).

All variants run in this process, interleaved, on the same inputs; the median of ``--reps``
runs is reported with ratios to the dense MLP and to the einsum baseline. A second part times
the block with experts sharded over 1/2/4/8 devices (``jax.shard_map`` + ``all_to_all``) in a
subprocess with 8 fake CPU devices; on fake devices this measures overhead, not speed-up.

Run: ``python benchmarks/moe.py`` (writes benchmarks/results/moe.json and moe.md);
``--quick`` for a short smoke run on fewer tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
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
    """Median seconds per call of each jitted fn, runs interleaved (after one compile call)."""
    for fn, a in zip(fns, args, strict=True):
        jax.block_until_ready(fn(*a))
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, (fn, a) in enumerate(zip(fns, args, strict=True)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


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


def markdown(result):
    lines = [
        f"# MoE block benchmark ({result['device']})",
        "",
        f"hidden {HIDDEN}, expert MLP {MLP_DIM}, {EXPERTS} experts, top-{TOP_K}, capacity factor "
        f"{CAPACITY_FACTOR}; {result['num_tokens']} tokens; forward + backward, median of "
        f"{result['reps']} runs. Command: `{result['command']}`",
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
    args = parser.parse_args(argv)
    num_tokens = args.tokens or (4096 if args.quick else 8192)
    reps = args.reps or (2 if args.quick else 3)
    group_sizes = (512,) if args.quick else (512, 4096)
    result = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()})",
        "jax": jax.__version__,
        "command": "python benchmarks/moe.py" + (" --quick" if args.quick else ""),
        "num_tokens": num_tokens,
        "reps": reps,
        "dispatch": bench_dispatch(num_tokens, group_sizes, reps),
    }
    if not args.no_sharded:
        result["sharded"] = run_sharded_subprocess(num_tokens, 512, reps)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "moe.quick" if args.quick else "moe"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
