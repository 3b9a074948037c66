"""``remat`` and ``scan_layers`` on every transformer-style model: the same outputs, gradients,
captures and updated state as the plain loop, and the same parameter layout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.configs.registry import get_preset
from flaxlab.models.mixer import Mixer, MixerConfig
from flaxlab.models.performer_lm import PerformerLM, PerformerLMConfig
from flaxlab.models.vit import ViT, ViTConfig
from flaxlab.models.vmoe import MoeConfig, VMoE, VMoEConfig
from flaxlab.nn import AttentionConfig

IMAGES = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1.0, maxval=1.0)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
VISION = dict(num_classes=3, image_size=(8, 8), num_channels=1, patch_size=(4, 4))
TRANSFORMER = dict(VISION, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16)


def vit(**kw):
    return ViT(ViTConfig(**TRANSFORMER, **kw), rngs=nnx.Rngs(0))


def mixer(**kw):
    config = MixerConfig(
        **VISION, hidden_size=8, num_blocks=2, tokens_mlp_dim=4, channels_mlp_dim=16, **kw
    )
    return Mixer(config, rngs=nnx.Rngs(0))


def vmoe(**kw):
    # MoE in blocks 1 and 3 of 4: the scan takes two (dense, MoE) pairs.
    moe = MoeConfig(layers=(1, 3), num_experts=2, group_images=2, dispatch_kind="einsum")
    config = VMoEConfig(**dict(TRANSFORMER, num_layers=4), moe=moe, **kw)
    return VMoE(config, rngs=nnx.Rngs(0))


def performer(**kw):
    attention = AttentionConfig(kind="favor", num_features=4)
    config = PerformerLMConfig(
        seq_len=12, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16, attention=attention
    )
    return PerformerLM(dataclasses.replace(config, **kw), rngs=nnx.Rngs(0))


def run(model, inputs, deterministic, capture=()):
    """Jitted ``(loss, (outputs, updated non-parameter state)), parameter gradients``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    extra = {"capture": capture} if capture else {}

    def loss(params):
        # Fresh variables for the state the model updates (NNX mutates only this trace's).
        model = nnx.merge(graphdef, params, jax.tree.map(lambda leaf: leaf, rest))
        rngs = nnx.Rngs(0, dropout=1, gating=2)
        out = model(inputs, deterministic=deterministic, rngs=rngs, **extra)
        logits = out[0] if isinstance(out, tuple) else out
        weights = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
        new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return (logits * weights).sum(), (out, new_rest, rngs.dropout.count[...])

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, aux, nnx.to_pure_dict(grads)


def assert_trees_close(got, want, rtol=1e-6):
    """Leaves within ``rtol`` of the tree's largest magnitude (float32 sums may reorder)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(want)) or 1.0
    close = lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale + 1e-12)
    jax.tree.map(close, got, want)


CASES = {
    # model, inputs, deterministic, switched-on settings, capture, other settings
    "vit-token": (vit, IMAGES, True, dict(scan_layers=True), (), {}),
    "vit-gap-capture": (
        vit,
        IMAGES,
        True,
        dict(scan_layers=True, remat="dots"),
        ("attention", "features"),
        dict(classifier="gap"),
    ),
    "mixer": (
        mixer,
        IMAGES,
        False,
        dict(scan_layers=True, remat="full"),
        (),
        dict(drop_path_rate=0.2),
    ),
    "vmoe": (vmoe, IMAGES, True, dict(scan_layers=True), (), {}),
    "performer-lm": (
        performer,
        TOKENS,
        False,
        dict(scan_layers=True, remat="dots_no_batch"),
        (),
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_switches_give_the_plain_outputs_gradients_and_state(case):
    make, inputs, deterministic, switches, capture, settings = CASES[case]
    plain, switched = make(**settings), make(**settings, **switches)
    value, aux, grads = run(plain, inputs, deterministic, capture)
    got_value, got_aux, got_grads = run(switched, inputs, deterministic, capture)
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    # Outputs (logits; V-MoE's routing metrics; captured attention and features), the state the
    # model updated (FAVOR+ redraw counters and projections) and the random draws consumed.
    assert_trees_close(got_aux, aux)
    assert_trees_close(got_grads, grads)
    if capture:
        _, captured = aux[0]
        assert len(captured["attention"]) == len(captured["features"]) == 2
    if case == "performer-lm":
        calls = [b["attn"]["kernel"]["calls"] for b in got_aux[1]["encoder"]["blocks"].values()]
        assert [int(c) for c in calls] == [1, 1]  # FAVOR+ counts training calls per block


def test_switches_are_config_fields_checked_and_settable_from_the_command_line():
    for config in (ViTConfig, MixerConfig, VMoEConfig, PerformerLMConfig):
        with pytest.raises(ValueError, match=r"^remat='dot' is not .*accepted: \['none'"):
            config(remat="dot")
    for preset in ("vit-digits", "mixer-digits", "vmoe-digits", "performer-lm-stdlib"):
        config = get_preset(preset, ["model.remat=dots", "model.scan_layers=true"])
        assert (config.model.remat, config.model.scan_layers) == ("dots", True)
    with pytest.raises(ValueError, match="remat='sometimes'"):
        get_preset("vit-digits", ["model.remat=sometimes"])


def test_vmoe_with_nothing_repeated_cannot_scan():
    config = VMoEConfig(**dict(TRANSFORMER, num_layers=2), moe=MoeConfig(layers=(1,)))
    model = VMoE(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^V-MoE cannot scan its layers"):
        model(IMAGES)
