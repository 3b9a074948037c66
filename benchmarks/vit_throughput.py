"""ViT-B/16 and Mixer-B/16 images/s, inference and training, vs a hand-written jax.jit.

For each model and dtype, in one process: flaxlab's model (``flaxlab.models.ViT`` / ``Mixer``;
inference is ``model(images)`` jitted through ``nnx.split`` / ``nnx.merge``; training is
``flaxlab.train.make_train_step`` built as the estimator builds it: the task's softmax
cross-entropy, AdamW from ``flaxlab.optim.factory``, global-norm clipping, donated state) against
a minimal pure-JAX twin of the same computation: plain functions over a dict of arrays with the
same dtype policy (``bfloat16``: matmuls and activations in bf16; parameters, LayerNorm, softmax
and head in float32) and an ``optax`` AdamW step with the same clipping and weight-decay mask.

The twin is fed flaxlab's weights (the zero-initialised head replaced by a random one on both
sides, so that every layer matters) and must give the same parameter count, the same logits and
the same losses before and after one training step, checked on the benchmark's own first calls.
Compilation is excluded (ahead of time, then warm-up calls); the runs alternate flaxlab /
hand-written and their medians are compared: ratio = flaxlab / hand-written images/s. On CPU the
ratio of process CPU times is also given: it is the steadier one on a shared machine.

    python benchmarks/vit_throughput.py                  # CPU: float32, batch 2, 224x224
    python benchmarks/vit_throughput.py --dtypes float32,bfloat16    # CPU, both dtypes
    python benchmarks/vit_throughput.py --quick          # tiny models, 32x32
    python benchmarks/vit_throughput.py --batch 128 --steps 20       # GPU (its defaults)

Writes benchmarks/results/vit_throughput.json and .md (``--out PREFIX``: PREFIX.json / .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.models import Mixer, MixerConfig, ViT, ViTConfig, count_parameters
from flaxlab.optim.factory import make_optimizer, make_schedule
from flaxlab.train import ExperimentConfig, OptimizerConfig, make_task, make_train_step

RESULTS = Path(__file__).parent / "results"
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM, EPS = 1e-4, 1e-4, 1.0, 1e-6
NAMES = {"vit": "ViT-B/16", "mixer": "Mixer-B/16"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The twin's block layers, and where flaxlab keeps them.
VIT_LAYERS = dict(ln1="norm1", q="attn/query", k="attn/key", v="attn/value", o="attn/out")
VIT_LAYERS |= dict(ln2="norm2", fc1="mlp/fc1", fc2="mlp/fc2")
MIXER_LAYERS = dict(ln1="norm1", token1="token_mixing/fc1", token2="token_mixing/fc2")
MIXER_LAYERS |= dict(ln2="norm2", chan1="channel_mixing/fc1", chan2="channel_mixing/fc2")


def make_model(family: str, dtype: str, image_size: int, tiny: bool) -> ViT | Mixer:
    """ViT-B/16 or Mixer-B/16 with 1000 classes (``tiny``: 2 narrow blocks)."""
    fields: dict = dict(num_classes=1000, image_size=image_size, dtype=dtype)
    if family == "vit":
        if tiny:
            fields.update(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128)
        return ViT(ViTConfig.variant("B/16", **fields), rngs=nnx.Rngs(0))
    if tiny:
        fields.update(num_blocks=2, hidden_size=64, tokens_mlp_dim=32, channels_mlp_dim=128)
    return Mixer(MixerConfig.variant("B/16", **fields), rngs=nnx.Rngs(0))


def forward_flops(config) -> int:
    """Matmul FLOPs of one image's forward pass (2 per multiply-add)."""
    (ph, pw), (h, w) = config.patch_size, config.image_size
    patches, d = (h // ph) * (w // pw), config.hidden_size
    flops = 2 * patches * ph * pw * config.num_channels * d + 2 * d * config.num_classes
    if isinstance(config, ViTConfig):
        t = patches + 1
        per_layer = 8 * t * d * d + 4 * t * t * d + 4 * t * d * config.mlp_dim
        return flops + config.num_layers * per_layer
    per_block = 4 * d * patches * config.tokens_mlp_dim + 4 * patches * d * config.channels_mlp_dim
    return flops + config.num_blocks * per_block


# --------------------------------------------------------------------- the hand-written twin


def layer_norm(x, p):
    # flaxlab's LayerNorm has float32 parameters and no dtype: it computes and returns float32.
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    # (x - mean) * (rsqrt * g), as flax groups it: with ((x - mean) * rsqrt) * g, XLA:CPU
    # re-fuses the residual stream's transposes into every later block's backward (quadratic
    # in depth): a B/16 training step then compiles 3x and runs 2x slower.
    return (x - mean) * (jax.lax.rsqrt(var + EPS) * p["g"]) + p["b"]


def dense(x, p, dtype):
    return x.astype(dtype) @ p["w"].astype(dtype) + p["b"].astype(dtype)


def gelu(x):
    return jax.nn.gelu(x, approximate=True)


def patch_embed(images, p, patch: int, dtype):
    """The stride-``patch`` convolution as reshape + matmul: ``[B, patches, hidden]``."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // patch) * (w // patch), patch * patch * c)
    return dense(x, {"w": p["w"].reshape(patch * patch * c, -1), "b": p["b"]}, dtype)


def attention(x, block, heads: int, dtype):
    b, t, d = x.shape
    q, k, v = (dense(x, block[n], dtype).reshape(b, t, heads, d // heads) for n in "qkv")
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (d // heads) ** -0.5, axis=-1).astype(dtype)
    return dense(jnp.einsum("bhqs,bshk->bqhk", probs, v).reshape(b, t, d), block["o"], dtype)


def vit_forward(params, images, *, patch: int, heads: int, dtype):
    x = patch_embed(images, params["patch"], patch, dtype)
    cls = jnp.broadcast_to(params["cls"].astype(dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + params["pos"].astype(dtype)
    for block in params["blocks"]:
        x = x + attention(layer_norm(x, block["ln1"]), block, heads, dtype)
        y = gelu(dense(layer_norm(x, block["ln2"]), block["fc1"], dtype))
        x = x + dense(y, block["fc2"], dtype)
    x = layer_norm(x, params["norm"])[:, 0]
    return x @ params["head"]["w"] + params["head"]["b"]


def mixer_forward(params, images, *, patch: int, heads: int, dtype):
    del heads
    x = patch_embed(images, params["patch"], patch, dtype)
    for block in params["blocks"]:
        y = jnp.swapaxes(layer_norm(x, block["ln1"]), 1, 2)  # mix across patches
        y = dense(gelu(dense(y, block["token1"], dtype)), block["token2"], dtype)
        x = x + jnp.swapaxes(y, 1, 2)
        y = gelu(dense(layer_norm(x, block["ln2"]), block["chan1"], dtype))
        x = x + dense(y, block["chan2"], dtype)
    x = layer_norm(x, params["norm"]).mean(axis=1)
    return x @ params["head"]["w"] + params["head"]["b"]


def twin_params(model: ViT | Mixer) -> dict:
    """flaxlab's weights in the twin's layout (fresh buffers: both sides donate theirs)."""
    tree = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def layer(node, path: str) -> dict:
        for key in path.split("/"):
            node = node[key]
        weight = {"w": node["kernel"]} if "kernel" in node else {"g": node["scale"]}
        return weight | {"b": node["bias"]}

    vit = isinstance(model, ViT)
    blocks = tree["encoder"]["blocks"] if vit else tree["blocks"]
    names = VIT_LAYERS if vit else MIXER_LAYERS
    params = {
        "patch": layer(tree, "embedding" if vit else "stem"),
        "blocks": [
            {k: layer(blocks[i], path) for k, path in names.items()} for i in sorted(blocks)
        ],
        "norm": layer(tree, "encoder/encoder_norm" if vit else "pre_head_norm"),
        "head": layer(tree, "head"),
    }
    return params | ({"cls": tree["cls"], "pos": tree["posemb"]} if vit else {})


def twin_forward(config) -> Callable:
    vit = isinstance(config, ViTConfig)
    forward, heads = (vit_forward, config.num_heads) if vit else (mixer_forward, 0)
    kw = dict(patch=config.patch_size[0], heads=heads, dtype=DTYPES[config.dtype])
    return lambda params, images: forward(params, images, **kw)


def twin_train_step(forward: Callable):
    """``step(params, opt_state, images, labels) -> (params, opt_state, loss)`` and its ``tx``:
    clipping, then AdamW decaying the matrices (``w``) only, as flaxlab's ``kernel_mask``."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "w", params
    )
    tx = optax.chain(
        optax.clip_by_global_norm(CLIP_NORM),
        optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mask=decay_mask),
    )

    def loss_fn(params, images, labels):
        logits = forward(params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx


# --------------------------------------------------------------------- flaxlab's side


def flaxlab_inference(model):
    """``(infer(params, rest, images), params, rest)``: ``model(images)`` through nnx.merge."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (lambda p, r, images: nnx.merge(graphdef, p, r)(images)), params, rest


def flaxlab_training(model, family: str, steps: int):
    """``(train_step(state, batch), state)`` as ``flaxlab.train.Estimator`` builds them."""
    opt = OptimizerConfig(
        name="adamw",
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        warmup_steps=0,
        decay="constant",
        grad_clip_norm=CLIP_NORM,
    )
    task = make_task(ExperimentConfig(family=family, model=model.config, optimizer=opt))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    no_clip = dataclasses.replace(opt, grad_clip_norm=None)  # the step clips
    tx = make_optimizer(no_clip, steps, decay_mask=task.weight_decay_mask(params))
    step = make_train_step(
        task,
        task.wrap_optimizer(tx),
        graphdef,
        seed=0,
        schedule=make_schedule(opt, steps),
        grad_clip_norm=opt.grad_clip_norm,
        clip_mask=task.gradient_clip_mask(params),
    )
    state = {"params": params, "rest": rest, "opt_state": tx.init(params)}
    return step, state | {"step": jnp.zeros((), jnp.int32)}


# --------------------------------------------------------------------- checks and timing


def compile_timed(fn: Callable, args: tuple, donate: tuple[int, ...]):
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - start


def check(what: str, ours, twin, tolerance: float) -> float:
    """The largest difference relative to flaxlab's largest value; raises above ``tolerance``."""
    ours, twin = np.asarray(ours, np.float64), np.asarray(twin, np.float64)
    err = float(np.abs(ours - twin).max() / max(np.abs(ours).max(), 1e-30))
    if not err <= tolerance:  # also catches NaN
        raise AssertionError(f"twin check {what}: relative error {err:.2e} > {tolerance:.0e}")
    return err


def benchmark(family: str, dtype: str, modes: list[str], args) -> list[dict]:
    """The rows of one model and dtype; raises if the twin does not compute what flaxlab does."""
    model = make_model(family, dtype, args.image_size, tiny=args.quick)
    config = model.config
    head = model.head.kernel  # zero-initialised: every logit and most gradients would be 0
    head[...] = 0.02 * jax.random.normal(jax.random.key(1), head.shape)
    n_ours = count_parameters(model)
    n_twin = sum(x.size for x in jax.tree.leaves(twin_params(model)))
    if n_ours != n_twin:
        raise AssertionError(f"{family}: flaxlab has {n_ours} parameters, the twin {n_twin}")
    key_x, key_y = jax.random.split(jax.random.key(0))
    images = jax.random.uniform(key_x, (args.batch, *config.image_size, 3), minval=-1, maxval=1)
    labels = jax.random.randint(key_y, (args.batch,), 0, config.num_classes)
    tolerance, name = (1e-4 if dtype == "float32" else 3e-2), f"{family} {dtype}"
    runners, compile_s, checks = {}, {}, {}
    if "inference" in modes:
        infer, params, rest = flaxlab_inference(model)
        infer_ours, t_ours = compile_timed(infer, (params, rest, images), ())
        twin_p = twin_params(model)
        infer_twin, t_twin = compile_timed(twin_forward(config), (twin_p, images), ())
        ours, twin = infer_ours(params, rest, images), infer_twin(twin_p, images)
        checks["inference"] = {"logits": check(f"{name} logits", ours, twin, tolerance)}
        runners["inference"] = {
            "flaxlab": lambda: infer_ours(params, rest, images),
            "twin": lambda: infer_twin(twin_p, images),
        }
        compile_s["inference"] = {"flaxlab": t_ours, "twin": t_twin}
    losses: dict[str, list] = {"flaxlab": [], "twin": []}  # each step's, before its update
    if "train" in modes:
        step, state = flaxlab_training(model, family, steps=10**6)
        batch = {"image": images, "label": labels}
        train_ours_step, t_ours = compile_timed(step, (state, batch), (0,))
        twin_step_fn, tx = twin_train_step(twin_forward(config))
        p = twin_params(model)
        args_twin = (p, tx.init(p), images, labels)
        train_twin_step, t_twin = compile_timed(twin_step_fn, args_twin, (0, 1))
        box = {"flaxlab": state, "twin": (p, tx.init(p))}

        def train_ours():
            box["flaxlab"], metrics = train_ours_step(box["flaxlab"], batch)
            losses["flaxlab"].append(metrics["loss"])
            return metrics["loss"]

        def train_twin():
            twin_state, opt_state = box["twin"]
            twin_state, opt_state, loss = train_twin_step(twin_state, opt_state, images, labels)
            box["twin"] = (twin_state, opt_state)
            losses["twin"].append(loss)
            return loss

        runners["train"] = {"flaxlab": train_ours, "twin": train_twin}
        compile_s["train"] = {"flaxlab": t_ours, "twin": t_twin}

    rows = []
    for mode, pair in runners.items():
        for run in pair.values():
            for _ in range(args.warmup):
                jax.block_until_ready(run())
        wall: dict[str, list[float]] = {"flaxlab": [], "twin": []}
        cpu: dict[str, list[float]] = {"flaxlab": [], "twin": []}
        for _ in range(args.repeats):  # alternating: drift on a shared machine hits both sides
            for side, run in pair.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready([run() for _ in range(args.steps)])
                wall[side].append(time.perf_counter() - start)
                cpu[side].append(time.process_time() - start_cpu)
        if mode == "train":  # the forward pass, then the gradients and the optimizer
            checks["train"] = {
                what: check(f"{name} {what}", losses["flaxlab"][i], losses["twin"][i], tolerance)
                for i, what in enumerate(("loss", "loss_after_one_step"))
            }
            losses.clear()
        ours = args.steps * args.batch / statistics.median(wall["flaxlab"])
        twin = args.steps * args.batch / statistics.median(wall["twin"])
        gflop = forward_flops(config) * (3 if mode == "train" else 1) / 1e9
        row = {
            "model": NAMES[family] + (" (tiny)" if args.quick else ""),
            "dtype": dtype,
            "mode": mode,
            "gflop_per_image": gflop,
            "flaxlab_images_per_s": ours,
            "hand_written_images_per_s": twin,
            "ratio": ours / twin,
            "ratio_cpu_time": statistics.median(cpu["twin"]) / statistics.median(cpu["flaxlab"]),
            "flaxlab_tflop_per_s": ours * gflop / 1e3,
            "parameters": n_ours,
            "twin_check_rel_err": checks[mode],
            "compile_s": compile_s[mode],
        }
        print(json.dumps(row), flush=True)
        rows.append(row | {"wall_s": wall, "cpu_s": cpu})
    return rows


def device_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return (
        f"{device.platform} / {device.device_kind} x{jax.device_count()} ({platform.machine()}, "
        f"{cores} CPU core{'s' if cores != 1 else ''} usable); jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}"
    )


def main():
    parser = argparse.ArgumentParser(description="ViT / Mixer images/s vs a hand-written jit")
    parser.add_argument("--batch", type=int, help="images per step (default: CPU 2, else 128)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: CPU 1, else 20)")
    parser.add_argument("--repeats", type=int, help="alternating runs (default: CPU 3, else 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--models", default="vit,mixer", help=f"of {list(NAMES)}")
    parser.add_argument("--dtypes", help=f"of {list(DTYPES)} (default: CPU float32, else both)")
    parser.add_argument("--modes", default="inference,train", help="of inference, train")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="tiny models at 32x32 (seconds)")
    parser.add_argument("--out", help="results prefix (default: benchmarks/results/vit_throughput)")
    args = parser.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    # One CPU core compiles a B/16 training step in ~15 s and runs it in ~3 s at batch 2: the
    # CPU default (float32 only) stays under 3 minutes; both dtypes take twice as long.
    defaults = dict(batch=2, steps=1, repeats=3) if on_cpu else dict(batch=128, steps=20, repeats=5)
    if args.quick:
        args.image_size, defaults = 32, dict(batch=8, steps=5, repeats=5)
    for field, value in defaults.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    args.dtypes = args.dtypes or ("float32" if on_cpu else "float32,bfloat16")
    args.warmup = max(args.warmup, 1)  # the first two steps' losses are checked
    chosen = {}
    for field, accepted in (
        ("models", NAMES),
        ("dtypes", DTYPES),
        ("modes", ("inference", "train")),
    ):
        chosen[field] = getattr(args, field).split(",")
        unknown = sorted(set(chosen[field]) - set(accepted))
        if unknown:
            parser.error(f"unknown --{field} {unknown}; accepted: {list(accepted)}")

    start, start_cpu = time.perf_counter(), time.process_time()
    rows = [
        row
        for family in chosen["models"]
        for dtype in chosen["dtypes"]
        for row in benchmark(family, dtype, chosen["modes"], args)
    ]
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu

    device = device_line()
    prefix = args.out or str(RESULTS / ("vit_throughput" + ("_quick" if args.quick else "")))
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "args": vars(args), "wall_s": wall, "cpu_s": cpu, "rows": rows}
    Path(prefix + ".json").write_text(json.dumps(payload, indent=1))
    worst = max(e for r in rows for e in r["twin_check_rel_err"].values())
    lines = [
        f"ViT / Mixer images/s, flaxlab vs a hand-written jax.jit twin (images "
        f"{args.image_size}x{args.image_size}, batch {args.batch}, {args.steps} step(s) per "
        f"run, median of {args.repeats} alternating runs; compilation excluded)",
        "",
        f"- device: {device}",
        "- the twin, fed flaxlab's weights, has the same parameter count and gives the same "
        f"logits and losses before and after one AdamW step (relative error <= {worst:.1e})",
        "- GFLOP/img: matmul FLOPs, 2 per multiply-add (the papers' 17.6 'GFLOPs' of ViT-B/16 "
        "count multiply-adds); training counts 3x the forward pass",
        f"- wall time {wall:.0f} s, {cpu:.0f} s of CPU time"
        + ("; ratio (CPU time): the processes' CPU-time ratio, steadier on a shared CPU" * on_cpu),
        "",
        "| model | dtype | mode | GFLOP/img | flaxlab img/s | hand-written img/s | ratio |"
        + (" ratio (CPU time) |" * on_cpu),
        "| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" * on_cpu),
    ] + [
        f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['gflop_per_image']:.3g} | "
        f"{r['flaxlab_images_per_s']:.2f} | {r['hand_written_images_per_s']:.2f} | "
        f"{r['ratio']:.3f} |" + (f" {r['ratio_cpu_time']:.3f} |" * on_cpu)
        for r in rows
    ]
    Path(prefix + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
