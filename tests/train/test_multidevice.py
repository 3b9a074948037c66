"""Data parallelism on 8 fake CPU devices, in one subprocess."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flaxlab.configs import get_preset
    from flaxlab.train import Estimator, Checkpointer
    from tests.train.tiny import TINY

    assert jax.device_count() == 8
    config = get_preset("vit-digits", TINY + ["train.steps=6", "train.checkpoint_every=6"])
    root = os.environ["WORK"]
    eight = Estimator(config, root + "/eight", progress=False)
    assert eight.mesh.shape["data"] == 8
    final8 = eight.train()
    one = Estimator(config, root + "/one", progress=False, num_devices=1)
    final1 = one.train()
    assert abs(final8["loss"] - final1["loss"]) < 1e-4, (final8, final1)
    _, s8 = eight._restore(Checkpointer(root + "/eight/checkpoints", read_only=True), None)
    _, s1 = one._restore(Checkpointer(root + "/one/checkpoints", read_only=True), None)
    gap = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
    diffs = jax.tree.leaves(jax.tree.map(gap, s8["params"], s1["params"]))
    assert max(diffs) < 1e-4, max(diffs)  # Adam normalises tiny gradient differences
    # The batch really is split over 8 devices.
    from flaxlab.train import sharding
    from flaxlab.data.factory import make_data
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
    """
)


def test_data_parallel_on_8_devices_matches_one_device(tmp_path):
    import os

    env = dict(os.environ, WORK=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=os.getcwd()
    )
    assert "MULTIDEVICE-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
