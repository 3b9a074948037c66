"""Every family trains under data, FSDP, tensor-parallel, mixed (and, for V-MoE, expert)
layouts on 8 fake CPU devices with the metrics and parameters of one device (run by
test_layouts.py in its own process: the device count is fixed when JAX starts).

The suite checks the mixed layout (data=2, fsdp=2, model=2: every axis split at once) for
every family, V-MoE's expert layout, and the pure data, fsdp and model layouts for ViT;
``python -m tests.train.layouts_script --all [FAMILY...]`` checks every layout of every family
(about 10 minutes on 2 cores).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flaxlab.configs import get_preset  # noqa: E402
from flaxlab.data.factory import make_data  # noqa: E402
from flaxlab.train import Estimator, sharding  # noqa: E402
from flaxlab.train.sharding import MeshConfig  # noqa: E402
from tests.train.tiny import TINY  # noqa: E402

assert jax.device_count() == 8
VIT = TINY[:4]
FAMILIES = {
    "vit-digits": VIT,
    "mixer-digits": [
        "model.hidden_size=16",
        "model.num_blocks=1",
        "model.tokens_mlp_dim=8",
        "model.channels_mlp_dim=16",
    ],
    "vmoe-digits": ["model.moe.layers=1", "model.num_layers=2", "model.moe.num_experts=2"]
    + [s for s in VIT if not s.startswith("model.num_layers")],
    "vdm-digits": ["model.schedule=fixed", "model.width=8", "model.depth=0", "model.groups=4"],
    "performer-lm-stdlib": [
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.mlp_dim=32",
        "model.num_layers=1",
        "model.seq_len=16",
        "model.attention.num_features=8",
        "data.seq_len=16",
    ],
    "lit-digits": [
        "model.image.hidden_size=16",
        "model.image.num_layers=1",
        "model.image.num_heads=2",
        "model.image.mlp_dim=32",
        "model.text.hidden_size=16",
        "model.text.num_layers=1",
        "model.text.num_heads=2",
        "model.text.mlp_dim=32",
    ],
}
LAYOUTS = {
    "data": MeshConfig(data=8),
    "fsdp": MeshConfig(data=1, fsdp=8),
    "model": MeshConfig(data=1, model=8),
    "mixed": MeshConfig(data=2, fsdp=2, model=2),
}
EXPERT = MeshConfig(data=4, expert=2)
COMMON = ["data.batch_size=16", "optimizer.warmup_steps=1", "train.steps=10"]
everything = "--all" in sys.argv
only = [a for a in sys.argv[1:] if a != "--all"]  # families to check (default: all)
SUITE = {"vit-digits": ("data", "fsdp", "model", "mixed"), "vmoe-digits": ("mixed", "expert")}
root = tempfile.mkdtemp()
start = time.time()


def gap(path, a, b) -> float:
    if jax.tree_util.keystr(path).find("['key']['bias']") >= 0:
        # Its gradient is zero in exact arithmetic (softmax ignores a constant added to a
        # query's logits): Adam turns the float noise into steps of any sign, up to lr.
        return 0.0
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def two_steps(config, name, num_devices):
    run = Estimator(config, f"{root}/{name}", progress=False, num_devices=num_devices)
    batches = make_data(config.data)[0]
    step = run.make_train_step()
    state, losses = run.init_state(), []
    sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(run.shardings["params"]))
    for i in range(2):
        state, metrics = step(state, sharding.shard_batch(batches(i), run.mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), sharded


for preset, tiny in FAMILIES.items():
    if only and preset not in only:
        continue
    config = get_preset(preset, tiny + COMMON)
    want_losses, want_params, _ = two_steps(config, f"{preset}-one", 1)
    layouts = dict(LAYOUTS, expert=EXPERT) if preset == "vmoe-digits" else LAYOUTS
    if not everything:
        layouts = {k: v for k, v in layouts.items() if k in SUITE.get(preset, ("mixed",))}
    for layout, mesh in layouts.items():
        laid = dataclasses.replace(config, mesh=mesh)
        losses, params, sharded = two_steps(laid, f"{preset}-{layout}", 8)
        if layout != "data":  # parameters really are split in the other layouts
            assert sharded > 0, (preset, layout)
        for got, want in zip(losses, want_losses):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (preset, layout, losses)
        worst = max(jax.tree.leaves(jax.tree_util.tree_map_with_path(gap, params, want_params)))
        assert worst < 1e-4, (preset, layout, worst)  # Adam normalises tiny gradient gaps
        print(f"{preset} {layout}: {sharded} split arrays, ok at {time.time() - start:.0f} s")
# The memory plan of a sharded run: exact state bytes per device, total within 10% of XLA.
from flaxlab.train.plan import plan_memory  # noqa: E402

if not only or "vit-digits" in only:
    laid = dataclasses.replace(get_preset("vit-digits", VIT + COMMON), mesh=LAYOUTS["mixed"])
    plan = plan_memory(laid, batch_size=32)
    rows = plan["rows"]
    state = sum(rows[k] for k in ("parameters", "optimizer slots", "ema", "other state"))
    assert state + rows["batch"] == plan["xla"]["arguments"], plan
    assert abs(plan["total"] / plan["xla_total"] - 1) < 0.10, plan
    one = plan_memory(get_preset("vit-digits", VIT + COMMON), batch_size=32, num_devices=1)
    assert rows["parameters"] < one["rows"]["parameters"] / 2  # fsdp x model split them
print("LAYOUTS-OK")
