"""SAM / GSAM through the estimator on 8 fake CPU devices (run by test_sharpness_devices.py in
its own process). Checks that the global scope equals SAM over the whole batch, that the device
scope equals the average of per-device SAM gradients (m-sharpness), and that every family
trains with both kinds in both scopes."""

import os
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from flaxlab.configs import get_preset  # noqa: E402
from flaxlab.data.factory import make_data  # noqa: E402
from flaxlab.optim import sam_gradient  # noqa: E402
from flaxlab.train import Estimator, sharding  # noqa: E402
from tests.train.tiny import TINY  # noqa: E402

assert jax.device_count() == 8
root = os.environ["WORK"]
PLAIN_SGD = [
    "optimizer.name=sgd",
    "optimizer.sgd.momentum=0",
    "optimizer.weight_decay=0",
    "optimizer.warmup_steps=0",
    "optimizer.decay=constant",
    "optimizer.learning_rate=1.0",
    "optimizer.grad_clip_norm=none",
    "data.batch_size=32",
    "data.crop_padding=0",
    "optimizer.sharpness=sam",
    "optimizer.rho_max=0.5",
]


def one_step_delta(scope):
    config = get_preset("vit-digits", TINY + PLAIN_SGD + [f"optimizer.sharpness_scope={scope}"])
    estimator = Estimator(config, f"{root}/{scope}", progress=False)
    state = estimator.init_state()
    # Random head weights: the zero head would give zero gradients elsewhere.
    head = state["params"]["head"]["kernel"]
    head[...] = jax.random.normal(jax.random.key(1), head[...].shape)
    p0 = jax.tree.map(np.asarray, state["params"])
    batch = make_data(config.data)[0](0)
    new, metrics = estimator.make_train_step()(state, sharding.shard_batch(batch, estimator.mesh))
    delta = jax.tree.map(lambda a, b: b - np.asarray(a), new["params"], p0)  # = +grads (lr 1)
    return estimator, p0, batch, delta, metrics


def reference(estimator):
    """``(params, batch) -> SAM gradient over the batch``, directly on one device."""
    rest = estimator.init_state()["rest"]

    @jax.jit
    def grads(p, images, labels):
        def loss(p, images, labels):
            model = nnx.merge(estimator.graphdef, p, rest)
            batch = {"image": images, "label": labels}
            return estimator.task.loss(model, batch, nnx.Rngs(0))[0]

        return sam_gradient(loss, p, images, labels, rho=0.5)[1]

    return lambda params, batch: grads(
        jax.tree.map(jnp.asarray, params), batch["image"], batch["label"]
    )


def gap(a, b):
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


start = time.time()
estimator, p0, batch, delta, metrics = one_step_delta("global")
reference_grads = reference(estimator)
want = reference_grads(p0, batch)
assert gap(delta, want) < 2e-5, gap(delta, want)
assert float(metrics["surrogate_gap"]) > 0 and abs(float(metrics["sharpness_rho"]) - 0.5) < 1e-6

estimator, p0, batch, delta, metrics = one_step_delta("device")
shards = [jax.tree.map(lambda x, i=i: x[4 * i : 4 * (i + 1)], batch) for i in range(8)]
want = jax.tree.map(lambda *g: sum(g) / 8, *[reference_grads(p0, s) for s in shards])
assert gap(delta, want) < 2e-5, gap(delta, want)
global_want = reference_grads(p0, batch)
assert gap(delta, global_want) > 1e-4  # m-sharpness is not the global perturbation

print(f"scopes checked in {time.time() - start:.0f} s", flush=True)
FAMILIES = {
    "vit-digits": TINY,
    "mixer-digits": [
        "model.hidden_size=16",
        "model.num_blocks=1",
        "model.tokens_mlp_dim=8",
        "model.channels_mlp_dim=16",
    ]
    + TINY[4:],
    "vmoe-digits": ["model.moe.layers=1", "model.num_layers=2", "model.moe.num_experts=2"]
    + [s for s in TINY if not s.startswith("model.num_layers")],
    "vdm-digits": [
        "model.schedule=fixed",
        "model.width=8",
        "model.depth=0",
        "model.groups=4",
        "data.batch_size=16",
    ],
    "performer-lm-stdlib": [
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.mlp_dim=32",
        "model.num_layers=1",
        "model.seq_len=16",
        "model.attention.num_features=8",
        "data.seq_len=16",
        "data.batch_size=16",
        "data.eval_batch_size=64",
    ],
}
for preset, tiny in FAMILIES.items():
    for kind, scope in (("gsam", "device"), ("sam", "global")):
        settings = [f"optimizer.sharpness={kind}", f"optimizer.sharpness_scope={scope}"]
        config = get_preset(preset, tiny + settings)
        run = Estimator(config, f"{root}/{preset}-{kind}-{scope}", progress=False)
        batch = sharding.shard_batch(make_data(config.data)[0](0), run.mesh)
        state, metrics = run.make_train_step()(run.init_state(), batch)
        assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"])), preset
        assert np.isfinite(float(metrics["surrogate_gap"])), preset
        print(preset, kind, scope, f"ok at {time.time() - start:.0f} s", flush=True)
print("SHARPNESS-OK")
