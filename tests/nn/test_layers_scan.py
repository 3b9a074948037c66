import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.nn import Encoder, EncoderBlock
from flaxlab.nn.layers_scan import (
    REMAT_POLICIES,
    check_remat,
    remat_policy,
    run_blocks,
    scan_segments,
)

X = jax.random.normal(jax.random.key(1), (3, 5, 8))
TARGET = jnp.sin(jnp.arange(8.0))  # a non-degenerate loss: LayerNorm makes sum(y**2) constant


def encoder(**kw):
    settings = dict(dropout_rate=0.1, drop_path_rate=0.3, rngs=nnx.Rngs(0))
    settings.update(kw)
    return Encoder(8, 3, 2, 16, **settings)


def loss_and_grads(model, deterministic, seed=3):
    """Jitted loss, parameter gradients and the dropout stream's final count."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
        rngs = nnx.Rngs(dropout=seed)
        y = nnx.merge(graphdef, params, rest)(x, deterministic=deterministic, rngs=rngs)
        return (y * TARGET).sum(), rngs.dropout.count[...]

    (value, count), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, X)
    return value, nnx.to_pure_dict(grads), int(count)


def assert_trees_close(got, want, rtol=1e-6):
    """Leaves within ``rtol`` of the tree's largest magnitude (float32 sums may reorder; some
    gradients, such as the key biases', are zero up to rounding)."""
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(want))
    close = lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale + 1e-12)
    jax.tree.map(close, got, want)


def test_scan_segments_finds_repeated_patterns():
    assert scan_segments("aaaa") == [(0, 1, 4)]
    assert scan_segments("aaab") == [(0, 1, 3), (3, 1, 1)]
    assert scan_segments("abababab") == [(0, 2, 4)]
    assert scan_segments("aaaaabab") == [(0, 1, 5), (5, 1, 1), (6, 1, 1), (7, 1, 1)]
    assert scan_segments("ab") == [(0, 1, 1), (1, 1, 1)]
    assert scan_segments([]) == []


def test_remat_names_are_checked_and_map_to_checkpoint_policies():
    assert check_remat("dots") == "dots"
    assert remat_policy("none") is None
    assert remat_policy("dots") is jax.checkpoint_policies.dots_saveable
    assert remat_policy("full") is jax.checkpoint_policies.nothing_saveable
    assert "dots_no_batch" in REMAT_POLICIES
    with pytest.raises(ValueError, match=r"remat='dot' is not .*accepted: \['none', 'full'"):
        check_remat("dot")
    with pytest.raises(ValueError, match="remat='all'"):
        encoder(remat="all")


@pytest.mark.parametrize(
    "deterministic, variant",
    [(True, dict(remat="full")), (False, dict(remat="dots", scan_layers=True))],
)
def test_scan_and_remat_give_the_unrolled_outputs_gradients_and_draws(deterministic, variant):
    # Training mode covers dropout and a drop-path rate growing with depth (scanned per block):
    # the keys are the same, so the outputs are too; the stream ends at the same count. (The
    # models' tests cover the scan without remat, the capture and FAVOR+ state.)
    value, grads, count = loss_and_grads(encoder(), deterministic)
    assert count == (0 if deterministic else 3 * 3 + 2 * 2)  # block 0's rate is 0: no draw
    got_value, got_grads, got_count = loss_and_grads(encoder(**variant), deterministic)
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    assert_trees_close(got_grads, grads)
    assert got_count == count
    assert jax.tree.structure(got_grads) == jax.tree.structure(grads)  # the same parameters


def test_blocks_without_a_repeated_pattern_cannot_scan():
    blocks = [EncoderBlock(8, 2, 16, rngs=nnx.Rngs(0)), EncoderBlock(8, 2, 32, rngs=nnx.Rngs(0))]
    call = lambda block, x, rngs, **overrides: (block(x, **overrides), None)
    with pytest.raises(ValueError, match="^Toy cannot scan its layers: .*scan_layers=false$"):
        run_blocks(blocks, X, call, scan=True, owner="Toy")
    y, extras = jax.jit(lambda x: run_blocks(blocks, x, call, remat="full"))(X)
    np.testing.assert_allclose(y, blocks[1](blocks[0](X)), rtol=1e-6, atol=1e-6)
    assert extras == [None, None]
