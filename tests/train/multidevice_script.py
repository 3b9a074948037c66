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
print("MULTIDEVICE-OK")
