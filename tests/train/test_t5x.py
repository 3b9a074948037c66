"""T5X checkpoint layout: round trips, the files and msgpack T5X writes, foreign checkpoints.

The expected layout is spelled out here by hand from google-research/t5x ``t5x/checkpoints.py``
(``Checkpointer.save``, ``_write_state_to_tensorstore``, ``_get_spec``,
``_get_parameter_infos``) and the real checkpoint in ``t5x/testdata/tiny_t5/checkpoint_1``.
"""

import copy
import gzip
import os
import shutil
from pathlib import Path

import flax.serialization
import ml_dtypes
import msgpack
import numpy as np
import pytest
import tensorstore as ts

from flaxlab.train import t5x

BF16 = np.dtype(ml_dtypes.bfloat16)


def random_bits(rng, shape, dtype):
    """Arbitrary bit patterns (NaN payloads, -0, subnormals included) of ``dtype``."""
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def model(rng):
    """A T5-like parameter tree plus Adafactor-like optimizer state."""
    target = {
        "token_embedder": {"embedding": random_bits(rng, (11, 8), np.float32)},
        "encoder": {
            "layers_0": {
                "attention": {"query": {"kernel": random_bits(rng, (8, 4, 2), BF16)}},
                "mlp": {"wi": {"kernel": random_bits(rng, (8, 16), np.float32)}},
            },
            "layers_1": {"scale": random_bits(rng, (8,), BF16)},
        },
        "positions": [random_bits(rng, (5,), np.int32), random_bits(rng, (3, 2), np.int32)],
        "temperature": np.float32(0.5),
    }
    wi = target["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    state = {
        "step": np.asarray(42, np.int32),
        "param_states": {
            "encoder": {
                "layers_0": {
                    "mlp": {
                        "wi": {
                            "kernel": {
                                "m": random_bits(rng, wi.shape, np.float32),
                                "v": np.zeros((1,), np.float32),
                                "v_row": random_bits(rng, (8,), np.float32),
                                "v_col": random_bits(rng, (16,), np.float32),
                            }
                        }
                    }
                }
            }
        },
    }
    return target, state


def flat(tree, prefix=()):
    """{path tuple: leaf} with lists as "0", "1"... (written independently of the module)."""
    if isinstance(tree, list | tuple):
        tree = {str(i): v for i, v in enumerate(tree)}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, (*prefix, k)))
        return out
    return {prefix: tree}


def spec_paths(tree, prefix=()):
    """Sorted key paths of the TensorStore spec dicts in a msgpack tree."""
    if not isinstance(tree, dict):
        return []
    if {"driver", "kvstore", "metadata"} <= set(tree):
        return [prefix]
    return sorted(p for k, v in tree.items() for p in spec_paths(v, (*prefix, k)))


def raw_msgpack(path: Path):
    """The msgpack file decoded with plain msgpack; extension leaves stay ExtType."""
    return msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)


def ext_array(ext: msgpack.ExtType) -> np.ndarray:
    """Decodes flax's ndarray extension (code 1: packed (shape, dtype name, bytes))."""
    shape, name, data = msgpack.unpackb(ext.data, raw=False)
    dtype = BF16 if name == "bfloat16" else np.dtype(name)
    return np.frombuffer(data, dtype).reshape(shape)


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    target, state = model(rng)
    path = t5x.save_t5x(tmp_path, 42, target, state)
    assert path == tmp_path / "checkpoint_42"

    restored = t5x.load_t5x(path)
    assert restored["step"] == 42
    assert set(restored) == {"step", "target", "state"}
    got_t, want_t = flat(restored["target"]), flat(target)
    assert set(got_t) == set(want_t)  # lists come back as dicts keyed "0", "1"
    for key, value in want_t.items():
        assert same_bits(got_t[key], value), key
    got_s, want_s = flat(restored["state"]), flat(state)
    assert set(got_s) == set(want_s)
    for key, value in want_s.items():
        assert same_bits(got_s[key], value), key
    # the same checkpoint through its msgpack file and through the parent directory
    for where in (path / "checkpoint", tmp_path):
        again = t5x.load_t5x(where)
        assert again["step"] == 42
        assert same_bits(again["target"]["positions"]["1"], restored["target"]["positions"]["1"])


def test_round_trip_of_jax_arrays_and_a_python_step(tmp_path):
    import jax.numpy as jnp

    target = {"dense": {"kernel": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}}
    t5x.save_t5x(tmp_path, 3, target)
    restored = t5x.load_t5x(tmp_path)
    assert restored["step"] == 3
    assert same_bits(restored["state"]["step"], np.asarray(3, np.int32))
    assert same_bits(restored["target"]["dense"]["kernel"], np.asarray(target["dense"]["kernel"]))


def test_save_dtype_casts_target_like_t5x(tmp_path):
    target = {"w": np.asarray([1.5, -2.0, 3.25], BF16)}
    state = {"param_states": {"w": {"m": np.asarray([1.5, 0.0, 1.0], BF16)}}}
    path = t5x.save_t5x(tmp_path, 1, target, state, save_dtype="float32")
    spec = raw_msgpack(path / "checkpoint")["optimizer"]
    assert spec["target"]["w"]["dtype"] == "float32"
    assert spec["state"]["param_states"]["w"]["m"]["dtype"] == "bfloat16"  # only target is cast
    restored = t5x.load_t5x(path)
    assert same_bits(restored["target"]["w"], target["w"].astype(np.float32))
    assert same_bits(restored["state"]["param_states"]["w"]["m"], state["param_states"]["w"]["m"])


# --------------------------------------------------------------------------- layout


def expected_spec(name: str, dtype: str, shape, chunks):
    """What T5X stores for a tensorstore leaf: `_get_spec` (local path) normalized by
    ts.Spec.to_json() (trailing "/" on the path, gzip level 1), as in t5x/testdata."""
    return {
        "driver": "zarr",
        "dtype": dtype,
        "kvstore": {"driver": "file", "path": name + "/"},
        "metadata": {
            "chunks": list(chunks),
            "compressor": {"id": "gzip", "level": 1},
            "shape": list(shape),
        },
    }


def test_layout_matches_t5x(tmp_path):
    rng = np.random.default_rng(1)
    target, state = model(rng)
    path = t5x.save_t5x(tmp_path, 42, target, state)

    # only the finished directory remains: no .tmp-<timestamp> left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_42"]
    in_ts = {
        "target.token_embedder.embedding": ("float32", (11, 8)),
        "target.encoder.layers_0.attention.query.kernel": ("bfloat16", (8, 4, 2)),
        "target.encoder.layers_0.mlp.wi.kernel": ("float32", (8, 16)),
        "target.encoder.layers_1.scale": ("bfloat16", (8,)),
        "target.positions.0": ("int32", (5,)),
        "target.positions.1": ("int32", (3, 2)),
        "target.temperature": ("float32", ()),  # target scalars too: they have mesh axes
        # Adafactor `m` gets the parameter's axes; v_row/v_col/(1,) `v` and step have none
        "state.param_states.encoder.layers_0.mlp.wi.kernel.m": ("float32", (8, 16)),
    }
    assert sorted(p.name for p in path.iterdir()) == sorted(["checkpoint", *in_ts])

    contents = raw_msgpack(path / "checkpoint")
    assert list(contents) == ["version", "optimizer"]
    assert contents["version"] == 3
    optimizer = contents["optimizer"]
    assert list(optimizer) == ["state", "target"]  # jax.tree_map sorts the state dict
    assert spec_paths(optimizer) == sorted(tuple(name.split(".")) for name in in_ts)
    for name, (dtype, shape) in in_ts.items():
        keys = name.split(".")
        node = optimizer
        for k in keys:
            node = node[k]
        assert node == expected_spec(name, dtype, shape, shape), name  # small: one chunk
        zarray = (path / name / ".zarray").read_text()
        assert '"compressor":{"id":"gzip","level":1}' in zarray
        assert f'"shape":{list(shape)}'.replace(" ", "") in zarray
        chunk_files = [p.name for p in (path / name).iterdir() if p.name != ".zarray"]
        assert chunk_files == [".".join("0" * len(shape)) or "0"]
        # the one chunk is the gzip-compressed little-endian C-order array
        source = target if keys[0] == "target" else state
        want = np.asarray(flat(source)[tuple(keys[1:])])
        assert gzip.decompress((path / name / chunk_files[0]).read_bytes()) == want.tobytes()

    # inline leaves: flax's msgpack ndarray extension (code 1), no tensorstore directory
    inline = optimizer["state"]
    assert isinstance(inline["step"], msgpack.ExtType) and inline["step"].code == 1
    assert same_bits(ext_array(inline["step"]), np.asarray(42, np.int32))
    adafactor = inline["param_states"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    for key in ("v", "v_row", "v_col"):
        assert adafactor[key].code == 1
        want = state["param_states"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"][key]
        assert same_bits(ext_array(adafactor[key]), want)

    # T5X reads the file with flax.serialization.msgpack_restore: same tree
    via_flax = flax.serialization.msgpack_restore((path / "checkpoint").read_bytes())
    assert via_flax["version"] == 3
    assert via_flax["optimizer"]["target"]["positions"]["0"] == expected_spec(
        "target.positions.0", "int32", (5,), (5,)
    )
    assert same_bits(via_flax["optimizer"]["state"]["step"], np.asarray(42, np.int32))


def test_chunk_shape_follows_t5x_greedy_rule():
    # by hand: shrink the largest dimension (first on ties) to its next smaller divisor
    assert t5x.choose_chunk_shape((6, 4), 16) == [3, 4]
    assert t5x.choose_chunk_shape((4, 4), 4) == [2, 2]
    assert t5x.choose_chunk_shape((5, 3), 4) == [1, 3]
    assert t5x.choose_chunk_shape((), 8) == []
    # T5 vocabulary embedding, float32, 64 MiB chunks: 32128 = 2^7 * 251
    # 32128 -> 16064 -> 8032 (4096 is smaller) -> 4016: 4016 * 4096 <= 2^24 elements
    assert t5x.choose_chunk_shape((32128, 4096), 64 * 2**20 / 4) == [4016, 4096]


def test_large_arrays_are_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(t5x, "DESIRED_CHUNK_SIZE_BYTES", 64)  # 16 float32 per chunk
    target = {"w": np.arange(24, dtype=np.float32).reshape(6, 4)}
    path = t5x.save_t5x(tmp_path, 1, target)
    spec = raw_msgpack(path / "checkpoint")["optimizer"]["target"]["w"]
    assert spec["metadata"]["chunks"] == [3, 4]
    assert sorted(p.name for p in (path / "target.w").iterdir()) == [".zarray", "0.0", "1.0"]
    assert same_bits(t5x.load_t5x(path)["target"]["w"], target["w"])


def test_optax_state_placement():
    # optax Adam under T5X: mu/nu take the parameters' axes (tensorstore), count has none
    target = {"dense": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}
    rule = t5x.default_in_msgpack(target)
    assert not rule("state/param_states/0/mu/dense/kernel", np.zeros((3, 2)))
    assert not rule("state/param_states/0/nu/dense/bias", np.zeros(2))
    assert rule("state/param_states/0/count", np.zeros((), np.int32))
    assert rule("state/step", np.zeros((), np.int32))
    assert not rule("target/dense/bias", np.zeros(2))


def test_custom_in_msgpack(tmp_path):
    target = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.int32)}
    path = t5x.save_t5x(tmp_path, 5, target, in_msgpack=lambda name, arr: name == "target/b")
    assert not (path / "target.b").exists() and (path / "target.a").is_dir()
    restored = t5x.load_t5x(path)
    assert same_bits(restored["target"]["b"], target["b"])


def test_flatten_names():
    tree = {"encoder": {"layers_0": {"kernel": 1}, "blocks": [2, {"w": 3}]}, "empty": {}}
    names = t5x.flatten_t5x(tree)
    assert names == {
        "encoder/layers_0/kernel": 1,
        "encoder/blocks/0": 2,
        "encoder/blocks/1/w": 3,
    }
    assert t5x.array_dir_name("target/encoder/layers_0/kernel") == "target.encoder.layers_0.kernel"
    assert t5x.unflatten_t5x(names) == {
        "encoder": {"layers_0": {"kernel": 1}, "blocks": {"0": 2, "1": {"w": 3}}}
    }
    assert t5x.flatten_t5x(tree, keep_empty=True)["empty"] == {}
    spec = {"driver": "zarr", "kvstore": {}, "metadata": {}}
    assert t5x.flatten_t5x({"x": spec}) == {"x": spec}  # specs are leaves
    with pytest.raises(ValueError, match="separator"):
        t5x.flatten_t5x({"a/b": 1})


def test_ambiguous_directory_names_are_refused(tmp_path):
    target = {"a.b": np.ones(2, np.float32), "a": {"b": np.zeros(2, np.float32)}}
    with pytest.raises(ValueError, match="share the TensorStore directory 'target.a.b'"):
        t5x.save_t5x(tmp_path, 1, target)
    assert list(tmp_path.iterdir()) == []


def test_step_mismatch(tmp_path):
    with pytest.raises(ValueError, match="state\\['step'\\] is 4 but the checkpoint step is 5"):
        t5x.save_t5x(tmp_path, 5, {"w": np.ones(1)}, {"step": np.int32(4)})


# --------------------------------------------------------------------------- foreign writer


def write_like_t5x(ckpt_root: Path, step: int, arrays: dict, inline_state: dict, drivers: dict):
    """A minimal T5X writer: tensorstore zarr arrays + msgpack, temp dir, rename.

    ``arrays``: {"target/..." or "state/...": np array}; ``drivers``: kvstore driver per name
    (T5X's GCS and internal "gfile" variants, as they appear in msgpack files).
    """
    final = ckpt_root / f"checkpoint_{step}"
    tmp = ckpt_root / f"checkpoint_{step}.tmp-1700000000"
    tmp.mkdir(parents=True)
    tree: dict = {"target": {}, "state": copy.deepcopy(inline_state)}
    for name, arr in arrays.items():
        rel = name.replace("/", ".")
        meta = {"compressor": {"id": "gzip"}, "shape": arr.shape, "chunks": np.array(arr.shape)}
        dtype = "bfloat16" if arr.dtype == BF16 else arr.dtype.name
        full = {
            "driver": "zarr",
            "dtype": dtype,
            "kvstore": {"driver": "file", "path": os.path.join(tmp, rel)},
            "metadata": meta,
        }
        store = ts.open(full, create=True, open=True).result()
        store.write(arr).result()
        driver = drivers.get(name, "file")
        if driver == "gcs":
            kvstore = {"bucket": "t5x-dummy-bucket", "driver": "gcs", "path": rel + "/"}
        else:
            kvstore = {"driver": driver, "path": rel + "/"}
        stored = {
            "driver": "zarr",
            "dtype": dtype,
            "kvstore": kvstore,
            "metadata": {
                "chunks": list(arr.shape),
                "compressor": {"id": "gzip", "level": 1},
                "shape": list(arr.shape),
            },
        }
        node = tree
        *parents, last = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = stored

    def pack_ext(obj):
        packed = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes()), use_bin_type=True)
        code = 3 if isinstance(obj, np.generic) else 1  # flax: npscalar 3, ndarray 1
        return msgpack.ExtType(code, packed)

    data = msgpack.packb({"version": 3, "optimizer": tree}, default=pack_ext, use_bin_type=True)
    (tmp / "checkpoint").write_bytes(data)
    tmp.rename(final)
    return final


def test_loads_checkpoint_written_like_t5x(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {
        "target/decoder/layers_0/self_attention/key/kernel": random_bits(rng, (4, 2, 2), BF16),
        "target/decoder/logits_dense/kernel": random_bits(rng, (4, 7), np.float32),
        "target/decoder/relpos_bias/rel_embedding": random_bits(rng, (2, 32), np.float32),
        "state/param_states/decoder/logits_dense/kernel/v": random_bits(rng, (4, 7), np.float32),
    }
    inline = {
        "step": np.int32(1234),  # np scalar: flax's npscalar extension, as in t5x testdata
        "param_states": {
            "decoder": {"layers_0": {"self_attention": {"key": {"kernel": {"v_row": None}}}}}
        },
    }
    drivers = {
        "target/decoder/logits_dense/kernel": "gfile",
        "target/decoder/relpos_bias/rel_embedding": "gcs",
    }
    path = write_like_t5x(tmp_path, 1234, arrays, inline, drivers)
    assert t5x.is_t5x_checkpoint(path) and t5x.is_t5x_checkpoint(tmp_path)

    restored = t5x.load_t5x(tmp_path)
    assert restored["step"] == 1234
    for name, arr in arrays.items():
        node = restored
        for key in name.split("/"):
            node = node[key]
        assert same_bits(node, arr), name
    kernel_state = restored["state"]["param_states"]["decoder"]["layers_0"]["self_attention"]
    assert kernel_state["key"]["kernel"]["v_row"] is None


# --------------------------------------------------------------------------- atomicity


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    target = {"w": np.arange(4, dtype=np.float32)}
    t5x.save_t5x(tmp_path, 1, target)

    # a save killed before its rename: temp dir with arrays but (or even with) no msgpack
    killed = tmp_path / "checkpoint_2.tmp-1700000000"
    (killed / "target.w").mkdir(parents=True)
    (killed / "target.w" / "0").write_bytes(b"half")
    # and a step directory whose msgpack file never arrived (e.g. an interrupted copy)
    (tmp_path / "checkpoint_3" / "target.w").mkdir(parents=True)

    assert t5x.t5x_steps(tmp_path) == [1]
    assert t5x.is_t5x_checkpoint(tmp_path)
    restored = t5x.load_t5x(tmp_path)
    assert restored["step"] == 1 and same_bits(restored["target"]["w"], target["w"])

    # a save failing in the middle cleans its temp dir and keeps the old checkpoint
    def fail(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(t5x, "encode_msgpack", fail)
    with pytest.raises(KeyboardInterrupt):
        t5x.save_t5x(tmp_path, 4, {"w": np.zeros(4, np.float32)})
    assert not list(tmp_path.glob("checkpoint_4*"))
    assert t5x.load_t5x(tmp_path)["step"] == 1


def test_existing_step_is_kept_unless_overwrite(tmp_path):
    t5x.save_t5x(tmp_path, 1, {"w": np.ones(2, np.float32)})
    t5x.save_t5x(tmp_path, 1, {"w": np.zeros(2, np.float32)})  # T5X skips an existing step
    assert same_bits(t5x.load_t5x(tmp_path)["target"]["w"], np.ones(2, np.float32))
    t5x.save_t5x(tmp_path, 1, {"v": np.zeros(3, np.int32)}, overwrite=True)
    restored = t5x.load_t5x(tmp_path)
    assert set(restored["target"]) == {"v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1"]


# --------------------------------------------------------------------------- errors


def one_line_error(path, match, detected=False):
    with pytest.raises(ValueError, match=match) as info:
        t5x.load_t5x(path)
    message = str(info.value)
    assert "\n" not in message
    assert t5x.is_t5x_checkpoint(path) == detected  # detection reads only the msgpack file
    return message


def test_error_messages(tmp_path):
    missing = tmp_path / "nowhere"
    assert str(missing) in one_line_error(missing, "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in one_line_error(empty, "holds no T5X checkpoint")

    partial = tmp_path / "runs" / "checkpoint_7"
    partial.mkdir(parents=True)
    assert str(partial) in one_line_error(partial, "is partial: its msgpack file is missing")
    one_line_error(partial.parent, "no complete T5X checkpoint in .*checkpoint_7")

    tmp_dir = tmp_path / "checkpoint_8.tmp-1700000000"
    tmp_dir.mkdir()
    (tmp_dir / "checkpoint").write_bytes(msgpack.packb({"version": 3, "optimizer": {}}))
    one_line_error(tmp_dir, "temporary directory of an unfinished T5X save")

    def checkpoint_file(name, data):
        d = tmp_path / name / "checkpoint_1"
        d.mkdir(parents=True)
        (d / "checkpoint").write_bytes(data)
        return d

    garbage = checkpoint_file("garbage", b"\xc1\xc1 not msgpack")
    one_line_error(garbage, "is not a T5X checkpoint \\(not msgpack")
    tf_index = checkpoint_file("tf", b'model_checkpoint_path: "model.ckpt-100"\n')
    one_line_error(tf_index, "TensorFlow checkpoint index")
    other = checkpoint_file("other", msgpack.packb({"params": {"w": 1}}))
    one_line_error(other, "no 'version' and 'optimizer' entries")
    old = checkpoint_file("old", msgpack.packb({"version": 1, "optimizer": {}}))
    one_line_error(old, "version 1 is not supported")


def test_damaged_arrays(tmp_path):
    target = {"dense": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}}
    path = t5x.save_t5x(tmp_path / "a", 1, target)
    shutil.rmtree(path / "target.dense.kernel")
    message = one_line_error(
        path, "partial: array directory 'target.dense.kernel' is missing", True
    )
    assert str(path) in message

    path = t5x.save_t5x(tmp_path / "b", 1, target)
    (path / "target.dense.kernel" / "0.0").write_bytes(b"\x1f\x8b\x08 truncated")
    message = one_line_error(path, "cannot read array 'target.dense.kernel'", True)
    assert str(path) in message
