"""Reading google-research/vmoe partitioned checkpoints and loading them into a flaxlab VMoE.

The writer below follows the reference's ``vmoe/checkpoints/partitioned.py`` and
``serialization.py`` (written independently here): an index msgpack map of per-array entries
(shape, dtype, chunk slices, shard of each chunk) and data shards of flat sub-chunks, arrays cut
into chunks spread over the shards by the reference's smallest-shard-first rule. The expected
logits come from a float64 NumPy forward pass over the reference-named arrays.
"""

import math
import os

import jax
import ml_dtypes
import msgpack
import numpy as np
import pytest
from flax import nnx

from flaxlab.models.pretrained import resize_posemb
from flaxlab.models.vmoe import VMoE, VMoEConfig
from flaxlab.models.vmoe_checkpoints import (
    config_from_vmoe_params,
    flatten_vmoe_tree,
    load_vmoe_checkpoint,
    read_vmoe_checkpoint,
    read_vmoe_index,
    vmoe_from_checkpoint,
    vmoe_params_to_flaxlab,
)

MARKER = "__msgpack_array_chunk_a87ca2__"
BF16 = np.dtype(ml_dtypes.bfloat16)

# ----------------------------------------------------------------------------------------------
# A writer of the reference's partitioned format.


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _ndarray_ext(a: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(1, _pack((a.shape, a.dtype.name, a.tobytes("C"))))


def _slice_nd(region) -> bytes:
    return _pack(tuple(_pack((start, stop, None)) for start, stop in region))


def _index_info_ext(a: np.ndarray, regions, shards) -> msgpack.ExtType:
    shaped = _pack((a.shape, a.dtype.name, False, {}))
    return msgpack.ExtType(8, _pack((shaped, tuple(_slice_nd(r) for r in regions), tuple(shards))))


def split_regions(shape, max_items):
    """Cuts an array into chunks of at most ``max_items`` items, the smallest axes first, by
    the first divisor in 2..9 that is small enough (else the axis' size), as the reference."""
    regions = [tuple((0, n) for n in shape)]
    items = math.prod(shape)
    if items <= max_items:
        return regions
    for axis in sorted(range(len(shape)), key=lambda a: (shape[a], a)):
        size = shape[axis]
        if size == 1:
            continue
        parts = [p for p in range(2, 10) if size % p == 0 and items // p <= max_items]
        parts = parts[0] if parts else size
        step = size // parts
        regions = [
            r[:axis] + ((j, j + step),) + r[axis + 1 :]
            for r in regions
            for j in range(0, size, step)
        ]
        items //= parts
        if items <= max_items:
            break
    return regions


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def write_partitioned(
    prefix,
    flat,
    *,
    num_shards=2,
    max_chunk_bytes=256,
    subchunk_items=7,
    version="20220622",
    reverse_maps=False,
):
    """Writes ``flat`` ('/'-joined names -> arrays) as the reference's partitioned checkpoint.

    The array numbers in the shards follow jax.tree_util's leaf order (sorted keys);
    ``reverse_maps`` stores the index's maps in another key order (msgpack maps are unordered).
    """
    names = _sorted_names(flat)  # the leaf order of jax.tree_util.tree_flatten
    bytes_per_shard = [0] * num_shards
    shard_content = {s: {MARKER: True} for s in range(num_shards)}
    index = {}
    for i, name in enumerate(names):
        a = np.asarray(flat[name])
        regions = sorted(split_regions(a.shape, max(max_chunk_bytes // a.dtype.itemsize, 1)))
        shards = []
        for region in regions:
            shard = min(range(num_shards), key=lambda s: (bytes_per_shard[s], s))
            chunk = a[tuple(slice(*r) for r in region)].reshape(-1)
            bytes_per_shard[shard] += chunk.size * a.dtype.itemsize
            shards.append(shard)
            subchunks = [
                _ndarray_ext(chunk[j : j + subchunk_items])
                for j in range(0, chunk.size, subchunk_items)
            ]
            entry = [subchunks, msgpack.ExtType(6, _slice_nd(region))]
            shard_content[shard].setdefault(str(i), []).append(entry)
        index[name] = _index_info_ext(a, regions, shards)
    if reverse_maps:
        index = dict(reversed(list(index.items())))
    content = {"shard_count": num_shards, "index": _nest(index)}
    if version is not None:
        content["version"] = version
    with open(f"{prefix}.index", "wb") as f:
        f.write(_pack(content))
    for shard, data in shard_content.items():
        with open(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}", "wb") as f:
            f.write(_pack(data))


def _sorted_names(flat):
    """The '/'-joined names in jax.tree_util's leaf order: dict keys sorted at every level."""
    names = []

    def walk(tree, path):
        for key in sorted(tree):
            if isinstance(tree[key], dict):
                walk(tree[key], (*path, key))
            else:
                names.append("/".join((*path, key)))

    walk(_nest(flat), ())
    return names


# ----------------------------------------------------------------------------------------------
# Reference-named parameters.


def reference_shapes(
    *, hidden, layers, heads, mlp, moe, experts, patch, channels, tokens, classes, representation
):
    """Names and shapes of the reference's VisionTransformerMoe parameters."""
    d = hidden // heads
    shapes = {
        "embedding/kernel": (patch, patch, channels, hidden),
        "embedding/bias": (hidden,),
        "cls": (1, 1, hidden),
        "Encoder/posembed_input/pos_embedding": (1, tokens, hidden),
        "Encoder/encoder_norm/scale": (hidden,),
        "Encoder/encoder_norm/bias": (hidden,),
        "head/kernel": (representation or hidden, classes),
        "head/bias": (classes,),
    }
    if representation:
        shapes["pre_logits/kernel"] = (hidden, representation)
        shapes["pre_logits/bias"] = (representation,)
    for i in range(layers):
        b = f"Encoder/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            shapes[f"{b}{norm}/scale"] = (hidden,)
            shapes[f"{b}{norm}/bias"] = (hidden,)
        for name in ("query", "key", "value"):
            shapes[f"{b}SelfAttention/{name}/kernel"] = (hidden, heads, d)
            shapes[f"{b}SelfAttention/{name}/bias"] = (heads, d)
        shapes[f"{b}SelfAttention/out/kernel"] = (heads, d, hidden)
        shapes[f"{b}SelfAttention/out/bias"] = (hidden,)
        if i in moe:
            shapes[f"{b}Moe/Router/dense/kernel"] = (hidden, experts)
            lead = (experts,)
            mlp_pre = f"{b}Moe/Mlp/"
        else:
            lead = ()
            mlp_pre = f"{b}Mlp/"
        shapes[f"{mlp_pre}Dense_0/kernel"] = (*lead, hidden, mlp)
        shapes[f"{mlp_pre}Dense_0/bias"] = (*lead, mlp)
        shapes[f"{mlp_pre}Dense_1/kernel"] = (*lead, mlp, hidden)
        shapes[f"{mlp_pre}Dense_1/bias"] = (*lead, hidden)
    return shapes


# MoE in the middle block: a dense block after it lets every token's routing reach the logits.
TINY = dict(
    hidden=16,
    layers=3,
    heads=2,
    mlp=32,
    moe=(1,),
    experts=4,
    patch=4,
    channels=3,
    tokens=5,
    classes=5,
    representation=12,
)
STORED_BF16 = ("cls", "Encoder/encoder_norm/scale", "Encoder/encoderblock_1/Moe/Mlp/Dense_1/bias")


def tiny_reference_params(seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in reference_shapes(**TINY).items():
        value = rng.normal(size=shape) * 0.3
        if name.endswith("/scale"):
            value = 1.0 + 0.1 * value
        params[name] = value.astype(BF16 if name in STORED_BF16 else np.float32)
    return params


# ----------------------------------------------------------------------------------------------
# An independent float64 NumPy forward pass over the reference names.


def _layer_norm(x, p, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attention(x, p, pre):
    q, k, v = (
        np.einsum("bnd,dhk->bnhk", x, p[f"{pre}{n}/kernel"]) + p[f"{pre}{n}/bias"]
        for n in ("query", "key", "value")
    )
    weights = _softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]))
    heads = np.einsum("bhqs,bshk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", heads, p[f"{pre}out/kernel"]) + p[f"{pre}out/bias"]


def _moe(x, p, pre, *, k, capacity_factor, group_tokens):
    """Top-k routing per group: first choices of all tokens queue before second choices; an
    assignment past the expert's capacity is dropped; kept outputs weighted by the gate."""
    router = p[f"{pre}Router/dense/kernel"]
    w1, b1 = p[f"{pre}Mlp/Dense_0/kernel"], p[f"{pre}Mlp/Dense_0/bias"]
    w2, b2 = p[f"{pre}Mlp/Dense_1/kernel"], p[f"{pre}Mlp/Dense_1/bias"]
    num_experts = router.shape[1]
    groups = x.reshape(-1, group_tokens, x.shape[-1])
    out, dropped = np.zeros_like(groups), 0
    for g, tokens in enumerate(groups):
        gates = _softmax(tokens @ router)
        choices = np.argsort(-gates, axis=-1, kind="stable")[:, :k]
        capacity = math.ceil(group_tokens * k * capacity_factor / num_experts)
        capacity += -capacity % 4
        queued = np.zeros(num_experts, int)
        for j in range(k):
            for s in range(group_tokens):
                e = choices[s, j]
                if queued[e] < capacity:
                    h = _gelu(tokens[s] @ w1[e] + b1[e])
                    out[g, s] += gates[s, e] * (h @ w2[e] + b2[e])
                else:
                    dropped += 1
                queued[e] += 1
    return out.reshape(x.shape), dropped


def numpy_forward(flat, images, *, k=2, capacity_factor=1.05, group_images=8):
    p = {name: np.asarray(v, np.float64) for name, v in flat.items()}
    batch, height, width, channels = images.shape
    kernel = p["embedding/kernel"]
    patch, hidden = kernel.shape[0], kernel.shape[-1]
    x = images.astype(np.float64).reshape(
        batch, height // patch, patch, width // patch, patch, channels
    )
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch * patch * channels)
    x = x @ kernel.reshape(-1, hidden) + p["embedding/bias"]
    x = np.concatenate([np.broadcast_to(p["cls"], (batch, 1, hidden)), x], axis=1)
    x = x + p["Encoder/posembed_input/pos_embedding"]
    group_tokens = math.gcd(batch, group_images) * x.shape[1]
    dropped = 0
    i = 0
    while f"Encoder/encoderblock_{i}/LayerNorm_0/scale" in p:
        b = f"Encoder/encoderblock_{i}/"
        x = x + _attention(_layer_norm(x, p, b + "LayerNorm_0"), p, b + "SelfAttention/")
        y = _layer_norm(x, p, b + "LayerNorm_1")
        if f"{b}Moe/Router/dense/kernel" in p:
            y, n = _moe(
                y, p, b + "Moe/", k=k, capacity_factor=capacity_factor, group_tokens=group_tokens
            )
            dropped += n
        else:
            h = _gelu(y @ p[b + "Mlp/Dense_0/kernel"] + p[b + "Mlp/Dense_0/bias"])
            y = h @ p[b + "Mlp/Dense_1/kernel"] + p[b + "Mlp/Dense_1/bias"]
        x = x + y
        i += 1
    x = _layer_norm(x, p, "Encoder/encoder_norm")[:, 0]
    x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return x @ p["head/kernel"] + p["head/bias"], dropped


# ----------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny release-style checkpoint: parameters only, index without a version (2022)."""
    params = tiny_reference_params()
    prefix = str(tmp_path_factory.mktemp("vmoe") / "release_ckpt")
    write_partitioned(prefix, params, version=None)
    return prefix, params


def test_reader_reassembles_chunks_across_shards(tmp_path):
    params = tiny_reference_params(1)
    tree = {f"params/{k}": v for k, v in params.items()}
    tree["step"] = np.asarray(1234, np.int32)
    tree["opt_state/mu/x"] = np.arange(30, dtype=np.float32).reshape(5, 6)
    prefix = str(tmp_path / "ckpt_1234")
    write_partitioned(prefix, tree, max_chunk_bytes=64, subchunk_items=5, reverse_maps=True)

    index = read_vmoe_index(prefix + ".index")
    assert (index.shard_count, index.version) == (2, "20220622")
    infos = flatten_vmoe_tree(index.tree)
    assert set(infos) == set(tree)
    split = [n for n, info in infos.items() if len(set(info.shards)) == 2]
    assert "params/Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel" in split
    assert infos["params/cls"].dtype == BF16

    restored = flatten_vmoe_tree(read_vmoe_checkpoint(prefix))
    assert set(restored) == set(tree)
    for name, value in tree.items():
        assert restored[name].dtype == value.dtype and restored[name].shape == value.shape, name
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    only_params = flatten_vmoe_tree(read_vmoe_checkpoint(prefix, subtree="params"))
    assert set(only_params) == set(params)
    # A training checkpoint's parameters map, nested or flat.
    expected = config_from_vmoe_params(only_params)
    assert config_from_vmoe_params(read_vmoe_checkpoint(prefix)) == expected
    assert config_from_vmoe_params(restored) == expected


def test_released_checkpoint_logits_match_numpy(released):
    prefix, params = released
    images = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype(np.float32)
    model = vmoe_from_checkpoint(prefix)
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.mlp_dim) == (16, 3, 2, 32)
    assert (c.moe.layers, c.moe.num_experts, c.moe.num_selected_experts) == ((1,), 4, 2)
    assert (c.patch_size, c.image_size, c.num_classes, c.representation_size) == (
        (4, 4),
        (8, 8),
        5,
        12,
    )
    outputs = {}
    for capacity_factor in (1.05, 0.5):
        logits, _ = model(images, capacity_factor=capacity_factor)
        expected, dropped = numpy_forward(params, images, capacity_factor=capacity_factor)
        np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
        outputs[capacity_factor] = (expected, dropped)
    # The capacity-bound semantics are exercised: more drops change the logits.
    assert outputs[0.5][1] > outputs[1.05][1]
    assert np.abs(outputs[0.5][0] - outputs[1.05][0]).max() > 1e-3


def test_other_image_size_and_classes(released):
    prefix, params = released
    model = vmoe_from_checkpoint(prefix, image_size=16, num_classes=7, eval_capacity_factor=2.0)
    assert model.config.moe.eval_capacity_factor == 2.0
    posemb = params["Encoder/posembed_input/pos_embedding"]
    np.testing.assert_allclose(np.asarray(model.posemb[...]), resize_posemb(posemb, (4, 4)))
    assert not np.any(np.asarray(model.head.kernel[...]))  # fresh head: 7 classes, not 5
    logits, _ = model(np.zeros((2, 16, 16, 3), np.float32))
    assert logits.shape == (2, 7)


def _flat_shapes(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_shapes(value, (*prefix, str(key))))
        else:
            out["/".join((*prefix, str(key)))] = tuple(value.shape)
    return out


@pytest.mark.parametrize(
    "variant, where, experts",
    [("S/32", "every2", 8), ("S/32", "last2", 8), ("B/16", "every2", 32), ("B/16", "every2", 8)],
)
def test_reference_layouts_map_onto_variants(variant, where, experts):
    expected = VMoEConfig.variant(variant, moe_layers=where, num_experts=experts)
    grid = expected.grid_size
    shapes = reference_shapes(
        hidden=expected.hidden_size,
        layers=expected.num_layers,
        heads=expected.num_heads,
        mlp=expected.mlp_dim,
        moe=expected.moe.layers,
        experts=experts,
        patch=expected.patch_size[0],
        channels=3,
        tokens=grid[0] * grid[1] + 1,
        classes=1000,
        representation=expected.hidden_size,
    )
    abstract = {n: jax.ShapeDtypeStruct(s, np.float32) for n, s in shapes.items()}
    config = config_from_vmoe_params(abstract)
    assert config == expected
    mapped = jax.eval_shape(lambda p: vmoe_params_to_flaxlab(p, config), abstract)
    model = nnx.eval_shape(lambda: VMoE(config, rngs=nnx.Rngs(0)))
    target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert _flat_shapes(mapped) == _flat_shapes(target)


def test_missing_shard_is_a_one_line_error(tmp_path):
    prefix = str(tmp_path / "ckpt")
    write_partitioned(prefix, tiny_reference_params())
    os.remove(f"{prefix}.data-00001-of-00002")
    with pytest.raises(ValueError, match=r"shard .*data-00001-of-00002' is missing") as err:
        read_vmoe_checkpoint(prefix)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="index .* does not exist"):
        read_vmoe_checkpoint(str(tmp_path / "nothing"))


def test_name_without_place_is_a_one_line_error():
    params = tiny_reference_params()
    params["Encoder/encoderblock_0/Extra/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="Encoder/encoderblock_0/Extra/kernel has no place") as err:
        vmoe_params_to_flaxlab(params)
    assert "\n" not in str(err.value)


def test_structure_mismatch_is_reported(released):
    prefix, params = released
    config = config_from_vmoe_params(params, moe={"layers": (0,)})
    with pytest.raises(ValueError, match=r"MoE at \(1,\), the model 3 with MoE at \(0,\)"):
        load_vmoe_checkpoint(VMoE(config, rngs=nnx.Rngs(0)), params)
