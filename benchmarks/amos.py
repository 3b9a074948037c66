"""Amos vs AdamW: optimizer-slot memory and update-step time.

(i) Slot memory by ``jax.eval_shape`` of ``init`` (nothing is allocated) on a BERT-base-shaped
tree (jestimator's names: vocab 30522, hidden 768, 12 layers, MLP 3072, 512 positions,
2 token types, MLM head) and on flaxlab's ViT-B/16 (or the same shapes built here when
``flaxlab.models.vit`` is missing). Amos uses the default rules (factored slots) with
momentum 0.9; the paper reports 50.1% of AdamW's slot bytes on BERT-base.

(ii) Time of one jitted training-state update ``(params, opt_state) -> (params', opt_state')``
(``tx.update`` + ``optax.apply_updates``, buffers donated), interleaving the optimizers run by
run and taking the median, on a ~10M-parameter BERT-like tree (``--size small``, CPU) or the
BERT-base tree (``--size base``, for an accelerator). Amos: factored slots, momentum 0.9,
clip 1.0 (the paper's BERT setting); AdamW: ``optax.adamw`` with weight decay. With
``--reference-path DIR`` (a directory holding google-research/jestimator's ``jestimator``
package) the reference implementation is timed too.

Run: ``python benchmarks/amos.py`` (writes benchmarks/results/amos.json and amos.md);
``--quick`` for a seconds-long smoke run on toy sizes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlab.optim import amos, default_eta_fn, default_shape_fn, scale_by_amos

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    # name: (vocab, hidden, layers, mlp, positions)
    "toy": (500, 32, 2, 128, 64),
    "small": (12000, 256, 8, 1024, 512),
    "base": (30522, 768, 12, 3072, 512),
}


def bert_shapes(vocab, hidden, layers, mlp, positions, token_types=2):
    """Parameter shapes of a BERT encoder + MLM head with jestimator's names (nested dict)."""
    dense = lambda fan_in, fan_out: {"kernel": (fan_in, fan_out), "bias": (fan_out,)}
    norm = {"scale": (hidden,), "bias": (hidden,)}
    encoder = {}
    for i in range(layers):
        encoder[f"layer_{i}"] = {
            "attention_block": {
                **{name: dense(hidden, hidden) for name in ("query", "key", "value", "output")},
                "layer_norm": norm,
            },
            "mlp_block": {
                "dense1": dense(hidden, mlp),
                "dense2": dense(mlp, hidden),
                "layer_norm": norm,
            },
        }
    return {
        "embedder_block": {
            "token_embed": {"embedding": (vocab, hidden)},
            "position_embed": {"embedding": (positions, hidden)},
            "segment_embed": {"embedding": (token_types, hidden)},
            "layer_norm": norm,
        },
        "encoder_block": encoder,
        "mlm_head": {"dense": dense(hidden, hidden), "layer_norm": norm, "bias": (vocab,)},
    }


def as_structs(shapes, dtype=jnp.float32):
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def vit_b16_params():
    """ViT-B/16 (1000 classes) parameter structs: flaxlab's model if present, else built here."""
    try:
        from flax import nnx

        from flaxlab.models.vit import ViT, ViTConfig

        config = ViTConfig.variant("B/16", num_classes=1000)
        model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
        return nnx.state(model, nnx.Param), "flaxlab.models.vit.ViT"
    except ImportError:
        pass
    hidden, mlp, layers, tokens = 768, 3072, 12, 197
    dense = lambda fan_in, fan_out: {"kernel": (fan_in, fan_out), "bias": (fan_out,)}
    norm = {"scale": (hidden,), "bias": (hidden,)}
    blocks = [
        {
            "norm1": norm,
            "attn": {name: dense(hidden, hidden) for name in ("query", "key", "value", "out")},
            "norm2": norm,
            "mlp": {"fc1": dense(hidden, mlp), "fc2": dense(mlp, hidden)},
        }
        for _ in range(layers)
    ]
    shapes = {
        "embedding": {"kernel": (16, 16, 3, hidden), "bias": (hidden,)},
        "cls": (1, 1, hidden),
        "posemb": (1, tokens, hidden),
        "encoder": {"blocks": blocks, "encoder_norm": norm},
        "head": dense(hidden, 1000),
    }
    return as_structs(shapes), "shapes built in benchmarks/amos.py"


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def amos_default(momentum=0.9, clip_value=1.0):
    return amos(0.005, default_eta_fn, default_shape_fn, momentum=momentum, clip_value=clip_value)


def adamw():
    return optax.adamw(1e-3, b1=0.9, b2=0.999, weight_decay=0.01)


def memory_rows(params, label):
    """Slot bytes of Amos variants and AdamW for one parameter tree."""
    adamw_bytes = tree_bytes(jax.eval_shape(adamw().init, params))
    rows = []
    for name, tx in [
        ("amos factored + momentum 0.9", amos_default(0.9)),
        ("amos factored, no momentum", amos_default(None)),
        ("adamw", adamw()),
    ]:
        slot = tree_bytes(jax.eval_shape(tx.init, params))
        rows.append(
            {
                "tree": label,
                "optimizer": name,
                "parameters": count_params(params),
                "slot_bytes": slot,
                "ratio_to_adamw": slot / adamw_bytes,
            }
        )
    return rows


def load_reference(path):
    """google-research/jestimator's ``amos`` module from a local checkout (timing only)."""
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("jestimator.amos")
    finally:
        sys.path.pop(0)


def make_step(tx):
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def time_updates(shapes, optimizers, repeats, warmup=3):
    """Median seconds per update for each optimizer, runs interleaved in one process."""
    structs = as_structs(shapes)
    rng = np.random.default_rng(0)
    make = lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape), s.dtype)
    params0 = jax.tree.map(make, structs)
    grads = jax.tree.map(make, structs)
    states = {}
    for name, tx in optimizers.items():
        params = jax.tree.map(jnp.copy, params0)
        states[name] = [make_step(tx), params, tx.init(params)]
    for _ in range(warmup):
        for entry in states.values():
            entry[1], entry[2] = entry[0](entry[1], entry[2], grads)
        jax.block_until_ready([entry[1:] for entry in states.values()])
    times = {name: [] for name in optimizers}
    names = list(optimizers)
    for run in range(repeats):
        order = names if run % 2 == 0 else names[::-1]
        for name in order:
            entry = states[name]
            start = time.perf_counter()
            entry[1], entry[2] = entry[0](entry[1], entry[2], grads)
            jax.block_until_ready(entry[1:])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, count_params(
        structs
    )


def timing_optimizers(reference):
    optimizers = {
        "adamw": adamw(),
        "amos (flaxlab)": amos_default(0.9, 1.0),
        "amos (flaxlab, optax.chain of clip/scale_by_amos/ema)": optax.chain(
            optax.clip(1.0),
            scale_by_amos(0.005, default_eta_fn, default_shape_fn),
            optax.ema(0.9, debias=False),
        ),
    }
    if reference is not None:
        optimizers["amos (jestimator reference)"] = reference.amos(
            0.005, default_eta_fn, shape_fn=default_shape_fn, momentum=0.9, clip_value=1.0
        )
    return optimizers


def markdown(result) -> str:
    lines = ["# Amos vs AdamW", "", f"Command: `{result['command']}`", ""]
    lines += [f"Device: {result['device']}", "", "## Optimizer-slot memory (jax.eval_shape)", ""]
    lines += [
        "| tree | parameters | optimizer | slot bytes | ratio to AdamW |",
        "|---|---|---|---|---|",
    ]
    for row in result["memory"]:
        lines.append(
            f"| {row['tree']} | {row['parameters']:,} | {row['optimizer']} | "
            f"{row['slot_bytes'] / 2**20:.1f} MiB | {row['ratio_to_adamw']:.1%} |"
        )
    timing = result["timing"]
    lines += [
        "",
        f"## Update-step time ({timing['size']}: {timing['parameters']:,} parameters)",
        "",
    ]
    lines += [
        f"Jitted `update + apply_updates`, donated buffers, {timing['repeats']} interleaved runs, "
        "median. `amos (flaxlab)`: `flaxlab.optim.amos` (packed slots, one reduction and one "
        "fused pass per "
        "parameter); `optax.chain of ...`: the reference's composition built from flaxlab's "
        "`scale_by_amos`; `jestimator reference`: google-research/jestimator's own `amos.py` "
        "(loaded from a local checkout with `--reference-path`, not part of flaxlab).",
        "",
        "| optimizer | median ms | ratio to AdamW |",
        "|---|---|---|",
    ]
    for name, seconds in timing["median_seconds"].items():
        lines.append(f"| {name} | {seconds * 1e3:.3f} | {timing['ratio_to_adamw'][name]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (toy sizes)")
    parser.add_argument("--reference-path", type=Path, default=None)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="path stem for .json/.md (default benchmarks/results/amos, amos.quick with --quick)",
    )
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    size = "toy" if args.quick else args.size
    repeats = 5 if args.quick else args.repeats

    memory = []
    if args.quick:
        memory += memory_rows(as_structs(bert_shapes(*SIZES["toy"])), "BERT toy")
    else:
        memory += memory_rows(as_structs(bert_shapes(*SIZES["base"])), "BERT-base")
        vit_params, vit_source = vit_b16_params()
        memory += memory_rows(vit_params, f"ViT-B/16 ({vit_source})")

    reference = load_reference(args.reference_path) if args.reference_path else None
    medians, parameters = time_updates(
        bert_shapes(*SIZES[size]), timing_optimizers(reference), repeats
    )
    result = {
        "command": " ".join(
            ["python benchmarks/amos.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), "
        f"load average {load_at_start:.1f} at the start",
        "memory": memory,
        "timing": {
            "size": size,
            "parameters": parameters,
            "repeats": repeats,
            "median_seconds": medians,
            "ratio_to_adamw": {name: t / medians["adamw"] for name, t in medians.items()},
        },
    }
    stem = args.output or RESULTS / ("amos.quick" if args.quick else "amos")
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
