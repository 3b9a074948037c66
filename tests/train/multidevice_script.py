"""Data parallelism on 8 fake CPU devices (run by test_multidevice.py in its own process, since
the device count is fixed when JAX starts). WORK names a scratch directory."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flaxlab.configs import get_preset  # noqa: E402
from flaxlab.data.factory import make_data  # noqa: E402
from flaxlab.train import Estimator, sharding  # noqa: E402
from tests.train.tiny import TINY  # noqa: E402

assert jax.device_count() == 8
config = get_preset("vit-digits", TINY + ["train.steps=6", "train.checkpoint_every=6"])
root = os.environ["WORK"]
eight = Estimator(config, root + "/eight", progress=False)
assert eight.mesh.shape["data"] == 8
final8 = eight.train()
one = Estimator(config, root + "/one", progress=False, num_devices=1)
final1 = one.train()
assert abs(final8["loss"] - final1["loss"]) < 1e-4, (final8, final1)
_, s8 = eight.restore_state()
_, s1 = one.restore_state()
gap = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
diffs = jax.tree.leaves(jax.tree.map(gap, s8["params"], s1["params"]))
assert max(diffs) < 1e-4, max(diffs)  # Adam normalises tiny gradient differences
# The batch really is split over 8 devices.
batch = sharding.shard_batch(make_data(config.data)[0](0), eight.mesh)
assert len(batch["image"].addressable_shards) == 8
assert batch["image"].addressable_shards[0].data.shape[0] == 4
# A checkpoint written on 8 devices restores onto 1 and evaluates to the same numbers.
step, metrics = Estimator(config, root + "/eight", progress=False, num_devices=1).evaluate()
assert step == 6 and abs(metrics["loss"] - final8["loss"]) < 1e-5
# A batch that cannot be split says so.
try:
    sharding.shard_batch({"x": np.zeros((12, 2))}, eight.mesh)
except ValueError as e:
    assert "12 examples cannot be split over 8 devices" in str(e)
else:
    raise AssertionError("no error")
# A run checkpointed under one mesh resumes under another (resharded on load) with the data
# order and metrics of the uninterrupted run.
import dataclasses  # noqa: E402
import shutil  # noqa: E402

from flaxlab.train.metrics import read_jsonl  # noqa: E402
from flaxlab.train.sharding import MeshConfig  # noqa: E402

steps = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=1", "train.ema_decay=0.9"]
config = get_preset("vit-digits", TINY + steps)
Estimator(config, root + "/whole", progress=False).train()  # all 8 devices on data
shutil.copytree(root + "/whole", root + "/moved")
shutil.rmtree(root + "/moved/checkpoints/8")
moved = dataclasses.replace(config, mesh=MeshConfig(data=1, fsdp=4, model=2))
resumed = Estimator(moved, root + "/moved", progress=False)
resumed.train()
assert any(not s.is_fully_replicated for s in jax.tree.leaves(resumed.shardings["params"]))
whole = read_jsonl(root + "/whole/metrics.jsonl")
again = read_jsonl(root + "/moved/metrics.jsonl")
assert [(r["step"], r["split"]) for r in again] == [(r["step"], r["split"]) for r in whole]
for a, b in zip(whole, again):
    assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
print("MULTIDEVICE-OK")
