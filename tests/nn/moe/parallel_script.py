"""Expert parallelism on 8 fake CPU devices equals one device (run by test_parallel.py in its
own process, since the device count is fixed at JAX's start)."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from flaxlab.nn.moe import MoeLayer  # noqa: E402


def run(layer, x):
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x, deterministic=False, rngs=nnx.Rngs(gating=3))
        return jnp.sum(y**2) + aux["auxiliary_loss"], (y, aux)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)


x = jax.random.normal(jax.random.key(1), (4, 16, 16))
Explicit, Auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
meshes = {
    "explicit8": jax.make_mesh((8,), ("expert",), axis_types=(Explicit,)),
    "auto2x4": jax.make_mesh((2, 4), ("data", "expert"), axis_types=(Auto, Auto)),
}
for kind in ("einsum", "indices"):
    kw = dict(
        num_selected_experts=2,
        group_size=8,
        capacity_factor=0.75,
        capacity_multiple_of=1,
        dispatch_kind=kind,
    )
    (_, (y0, aux0)), g0 = run(MoeLayer(16, 32, 8, rngs=nnx.Rngs(0), **kw), x)
    assert float(aux0["dropped_fraction"]) > 0
    for name, mesh in meshes.items():
        (_, (y1, aux1)), g1 = run(MoeLayer(16, 32, 8, rngs=nnx.Rngs(0), mesh=mesh, **kw), x)
        err_y = float(jnp.max(jnp.abs(y0 - y1)))
        err_aux = max(float(jnp.max(jnp.abs(aux0[k] - aux1[k]))) for k in aux0)
        err_grad = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1))
        )
        print(name, kind, err_y, err_aux, err_grad)
        assert err_y < 1e-5 and err_aux < 1e-5 and err_grad < 1e-4, (err_y, err_aux, err_grad)
try:
    MoeLayer(16, 32, 6, mesh=meshes["explicit8"], rngs=nnx.Rngs(0))(x)
except ValueError as e:
    assert "multiples" in str(e), e
else:
    raise AssertionError("6 experts on 8 devices must fail")


def training_output(graphdef):
    @jax.jit
    def apply(state, x, key):
        return nnx.merge(graphdef, state)(x, deterministic=False, rngs=nnx.Rngs(dropout=key))[0]

    return apply


# Dropout inside the experts under expert parallelism: each device draws its own masks; the
# output depends on the dropout key while training and not at all when deterministic.
for kind in ("einsum", "indices"):
    kw = dict(num_selected_experts=2, group_size=8, dispatch_kind=kind, noise_std=0.0)
    plain = MoeLayer(16, 32, 8, rngs=nnx.Rngs(0), mesh=meshes["auto2x4"], **kw)
    layer = MoeLayer(16, 32, 8, rngs=nnx.Rngs(0), mesh=meshes["auto2x4"], dropout_rate=0.3, **kw)
    graphdef, state = nnx.split(layer)

    train_out = training_output(graphdef)

    a, b = train_out(state, x, jax.random.key(1)), train_out(state, x, jax.random.key(2))
    assert float(jnp.abs(a - b).max()) > 1e-2, kind
    assert float(jnp.abs(a - train_out(state, x, jax.random.key(1))).max()) == 0.0, kind
    gap = float(jnp.abs(layer(x)[0] - plain(x)[0]).max())
    assert gap < 1e-6, (kind, gap)
print("PARALLEL OK")
