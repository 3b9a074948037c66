"""Amos rule helper (assign maps, restricted SHAPE evaluator), default rules and slot table."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlab.optim import (
    amos_param_table,
    amos_with_defaults,
    default_eta_fn,
    default_shape_fn,
    evaluate_shape_expression,
    params_fn_from_assign_map,
)
from flaxlab.optim.amos.defaults import with_overrides
from flaxlab.optim.amos.transform import unpack_slots


# ----------------------------------------------------------------------------- assign maps
def test_first_matching_rule_wins_in_order():
    fn = params_fn_from_assign_map({".*/kernel": 1.0, "dense/kernel": 2.0, ".*": 3.0})
    assert fn(("dense", "kernel"), (2, 2)) == 1.0
    assert fn(("dense", "bias"), (2,)) == 3.0
    reordered = params_fn_from_assign_map({"dense/kernel": 2.0, ".*/kernel": 1.0})
    assert reordered(("dense", "kernel"), (2, 2)) == 2.0


def test_match_is_anchored_at_the_start_and_uses_name_sep():
    fn = params_fn_from_assign_map({"kernel": 1.0, "a\\.kernel": 2.0, ".*": 0.0}, name_sep=".")
    assert fn(("a", "kernel"), (1,)) == 2.0  # "kernel" does not re.match "a.kernel"
    assert fn(("kernel",), (1,)) == 1.0


def test_no_matching_rule_names_the_parameter():
    fn = params_fn_from_assign_map({".*/kernel": 1.0})
    with pytest.raises(ValueError, match="'encoder/norm/scale' of shape \\(8,\\)"):
        fn(("encoder", "norm", "scale"), (8,))


def test_string_values_are_returned_as_they_are_without_eval():
    fn = params_fn_from_assign_map({".*": "sqrt(SHAPE[0])"})
    assert fn(("w",), (4,)) == "sqrt(SHAPE[0])"


def test_string_values_are_shape_expressions_with_eval():
    eta_fn = params_fn_from_assign_map(
        {".*conv/kernel": "sqrt(2 / prod(SHAPE[:-1]))", ".*kernel": "sqrt(1/SHAPE[0])", ".*": 0.5},
        eval_str_value=True,
    )
    shape_fn = params_fn_from_assign_map(
        {".*kernel": "(1,) * (2 - 1) + (SHAPE[-1],)", ".*": ()}, eval_str_value=True
    )
    assert eta_fn(("conv", "kernel"), (3, 3, 2, 8)) == pytest.approx(math.sqrt(2 / 18))
    assert eta_fn(("dense", "kernel"), (16, 4)) == pytest.approx(0.25)
    assert eta_fn(("dense", "bias"), (4,)) == 0.5
    assert shape_fn(("dense", "kernel"), (16, 4)) == (1, 4)
    assert shape_fn(("dense", "bias"), (4,)) == ()


@pytest.mark.parametrize(
    ("expression", "shape", "expected"),
    [
        ("SHAPE[0] * SHAPE[1] + 1", (3, 4), 13),
        ("SHAPE[-1] - SHAPE[0]", (3, 4), 1),
        ("SHAPE[1] / SHAPE[0]", (2, 5), 2.5),
        ("SHAPE[1] // SHAPE[0]", (2, 5), 2),
        ("SHAPE[1] % SHAPE[0]", (2, 5), 1),
        ("SHAPE[0] ** 2", (3,), 9),
        ("-SHAPE[0]", (3,), -3),
        ("+2.5", (), 2.5),
        ("sqrt(SHAPE[0])", (16,), 4.0),
        ("prod(SHAPE)", (2, 3, 4), 24),
        ("SHAPE[1:]", (2, 3, 4), (3, 4)),
        ("SHAPE[::2]", (2, 3, 4), (2, 4)),
        ("(SHAPE[0], 1)", (7, 3), (7, 1)),
        ("SHAPE", (7, 3), (7, 3)),
        ("(1,) * 3 + SHAPE[-1:]", (2, 2, 3, 8), (1, 1, 1, 8)),
        ("()", (5,), ()),
    ],
)
def test_shape_expressions(expression, shape, expected):
    assert evaluate_shape_expression(expression, shape) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("SHAPE.__class__", "Attribute"),
        ("().__class__.__bases__", "Attribute"),
        ("exp(1)", "calls 'exp'"),
        ("__import__('os')", "calls '__import__'"),
        ("open('f')", "calls 'open'"),
        ("SHAPE(1)", "calls 'SHAPE'"),
        ("x + 1", "the name 'x'"),
        ("sqrt", "must be called"),
        ("sqrt(x=4)", "keyword"),
        ("lambda: 1", "Lambda"),
        ("[s for s in SHAPE]", "ListComp"),
        ("[1, 2]", "List"),
        ("'abc'", "constant 'abc'"),
        ("True", "constant True"),
        ("SHAPE[0] if 1 else 2", "IfExp"),
        ("1 < 2", "Compare"),
        ("SHAPE[0] ** 1000", "exponent"),
        ("(1,) * 10 ** 6", "repeat"),
        ("sqrt(*SHAPE)", "Starred"),
        ("SHAPE[", "invalid"),
    ],
)
def test_refused_expressions(expression, message):
    with pytest.raises(ValueError, match=message):
        evaluate_shape_expression(expression, (4, 2))


def test_evaluation_errors_are_value_errors_naming_the_expression():
    with pytest.raises(ValueError, match="SHAPE\\[5\\]"):
        evaluate_shape_expression("SHAPE[5]", (4, 2))
    with pytest.raises(ValueError, match="1 / \\(SHAPE\\[0\\] - 4\\)"):
        evaluate_shape_expression("1 / (SHAPE[0] - 4)", (4, 2))


def test_bad_rules_are_refused_when_the_map_is_built():
    with pytest.raises(ValueError, match="not a valid regex"):
        params_fn_from_assign_map({"(": 1.0})
    with pytest.raises(ValueError, match="calls 'exp'"):
        params_fn_from_assign_map({".*": "exp(1)"}, eval_str_value=True)
    with pytest.raises(ValueError, match="mapping"):
        params_fn_from_assign_map([(".*", 1.0)])


def test_rule_evaluation_error_names_rule_and_parameter():
    fn = params_fn_from_assign_map({".*": "sqrt(1 / SHAPE[1])"}, eval_str_value=True)
    with pytest.raises(ValueError, match="rule '.\\*' for parameter 'bias'"):
        fn(("bias",), (3,))


# ----------------------------------------------------------------------------- default rules
def bert_paper_eta(name, hidden, mlp):
    """The paper's BERT table (arXiv 2210.11693), written out for jestimator's names."""
    if name[-2:] == ("layer_norm", "scale"):
        return 1.0
    if name[-1] == "bias":
        return 0.5
    if name[-1] == "embedding":
        return math.sqrt(2 / hidden)
    if name[-3:] == ("mlp_block", "dense2", "kernel"):
        return math.sqrt(2 / mlp)
    return math.sqrt(1 / hidden)


def bert_like_shapes(vocab=50, hidden=8, mlp=32, layers=2, positions=16):
    shapes = {
        ("embedder", "token_embed", "embedding"): (vocab, hidden),
        ("embedder", "position_embed", "embedding"): (positions, hidden),
        ("embedder", "type_embed", "embedding"): (2, hidden),
        ("embedder", "layer_norm", "scale"): (hidden,),
        ("embedder", "layer_norm", "bias"): (hidden,),
    }
    for i in range(layers):
        block = ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value", "output"):
            shapes[(*block, "attention", proj, "kernel")] = (hidden, hidden)
            shapes[(*block, "attention", proj, "bias")] = (hidden,)
        shapes[(*block, "mlp_block", "dense1", "kernel")] = (hidden, mlp)
        shapes[(*block, "mlp_block", "dense1", "bias")] = (mlp,)
        shapes[(*block, "mlp_block", "dense2", "kernel")] = (mlp, hidden)
        shapes[(*block, "mlp_block", "dense2", "bias")] = (hidden,)
        for norm in ("attention_layer_norm", "mlp_layer_norm"):
            shapes[(*block, norm, "layer_norm", "scale")] = (hidden,)
            shapes[(*block, norm, "layer_norm", "bias")] = (hidden,)
    return shapes


def test_defaults_reproduce_the_papers_bert_table():
    for name, shape in bert_like_shapes(hidden=8, mlp=32).items():
        assert default_eta_fn(name, shape) == pytest.approx(bert_paper_eta(name, 8, 32)), name
        if name[-1] == "kernel":
            assert default_shape_fn(name, shape) == (1, shape[1])
        elif name[-1] == "embedding":
            assert default_shape_fn(name, shape) == (shape[0], 1)
        else:
            assert default_shape_fn(name, shape) == ()


@pytest.mark.parametrize(
    ("name", "shape", "eta", "slot"),
    [
        (("embedding", "kernel"), (4, 4, 3, 16), math.sqrt(1 / 48), (1, 1, 1, 16)),
        (("posemb",), (1, 5, 16), math.sqrt(2 / 16), (1, 5, 1)),
        (("cls",), (1, 1, 16), math.sqrt(2 / 16), (1, 1, 1)),
        (("encoder", "blocks", "0", "mlp", "fc1", "kernel"), (16, 64), 0.25, (1, 64)),
        (("encoder", "blocks", "0", "mlp", "fc2", "kernel"), (64, 16), math.sqrt(2 / 64), (1, 16)),
        (("encoder", "blocks", "0", "attn", "out", "kernel"), (16, 16), 0.25, (1, 16)),
        (("attn", "out", "kernel"), (4, 8, 16), math.sqrt(1 / 32), (1, 1, 16)),
        (("encoder", "blocks", "0", "norm1", "scale"), (16,), 1.0, ()),
        (("encoder", "blocks", "0", "norm1", "bias"), (16,), 0.5, ()),
        (("moe", "experts", "fc1_kernel"), (4, 16, 64), 0.25, (4, 1, 64)),
        (("moe", "experts", "fc2_kernel"), (4, 64, 16), math.sqrt(2 / 64), (4, 1, 16)),
        (("moe", "experts", "fc2_bias"), (4, 16), 0.5, ()),
        (("MlpBlock_3", "Dense_1", "kernel"), (64, 16), math.sqrt(2 / 64), (1, 16)),
        (("other", "Dense_1", "kernel"), (64, 16), math.sqrt(1 / 64), (1, 16)),
        (("t5", "mlp", "wo", "kernel"), (64, 16), math.sqrt(2 / 64), (1, 16)),
        (("gamma", "w"), (1,), 1.0, ()),
        (("soft_moe", "scale"), (), 1.0, ()),
    ],
)
def test_default_rules_generalise_by_fan_in(name, shape, eta, slot):
    assert default_eta_fn(name, shape) == pytest.approx(eta)
    assert default_shape_fn(name, shape) == slot


def small_nested_tree():
    return {
        "embed": {"embedding": jnp.zeros((10, 4))},
        "blocks": [
            {
                "norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                "mlp": {
                    "fc1": {"kernel": jnp.zeros((4, 16)), "bias": jnp.zeros(16)},
                    "fc2": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)},
                },
            }
        ],
        "head": {"kernel": jnp.zeros((4, 3))},
    }


def slot_bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_table_lists_every_parameter_and_the_ratio_measured_by_eval_shape():
    params = small_nested_tree()
    table = amos_param_table(params, default_eta_fn, default_shape_fn, momentum=0.9)
    lines = table.splitlines()
    assert lines[0].split() == ["parameter", "shape", "eta", "slot", "shape", "slot", "bytes"]
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert set(rows) == {
        "blocks/0/mlp/fc1/bias",
        "blocks/0/mlp/fc1/kernel",
        "blocks/0/mlp/fc2/bias",
        "blocks/0/mlp/fc2/kernel",
        "blocks/0/norm/bias",
        "blocks/0/norm/scale",
        "embed/embedding",
        "head/kernel",
    }
    assert "(10, 4)  0.707107  (10, 1)" in rows["embed/embedding"]
    assert "(16, 4)  0.353553  (1, 4)" in rows["blocks/0/mlp/fc2/kernel"]
    # fc2 kernel: 2 slots of 4 floats + 64 momentum floats = 72 * 4 bytes.
    assert rows["blocks/0/mlp/fc2/kernel"].endswith("288 B")
    amos_state = jax.eval_shape(amos_with_defaults(0.01).init, params)
    adamw_state = jax.eval_shape(optax.adamw(0.01).init, params)
    count_bytes = 4  # both states hold one int32 step count
    ratio = (slot_bytes(amos_state) - count_bytes) / (slot_bytes(adamw_state) - count_bytes)
    assert lines[-1].startswith("8 tensors, 208 parameters;")
    assert lines[-1].endswith(f"ratio {ratio:.2%}")


def test_table_with_full_slots_and_no_momentum_equals_adamw_bytes():
    params = small_nested_tree()
    table = amos_param_table(params, lambda n, s: 1.0, None)
    assert table.splitlines()[-1].endswith("ratio 100.00%")


def test_amos_with_defaults_overrides_come_first():
    shape_overrides = {"embed/.*": "SHAPE", "head/kernel": ()}
    shape_fn = with_overrides(shape_overrides, default_shape_fn)
    tx = amos_with_defaults(
        0.01, eta_overrides={"head/kernel": 0.01}, shape_overrides=shape_overrides, momentum=None
    )
    params = small_nested_tree()
    state = tx.init(params)
    v = unpack_slots(state.v, params, shape_fn)
    assert v["embed"]["embedding"].shape == (10, 4)
    assert v["head"]["kernel"].shape == ()
    assert v["blocks"][0]["mlp"]["fc1"]["kernel"].shape == (1, 16)
    assert state.momentum is None
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    # Step 1 with zero parameters: u = -xi * eta * sqrt(1 - beta) / sqrt(1 - beta) * g = -xi eta.
    np.testing.assert_allclose(updates["head"]["kernel"], -0.01 * 0.01, rtol=1e-5)
    np.testing.assert_allclose(
        updates["blocks"][0]["mlp"]["fc2"]["kernel"], -0.01 * math.sqrt(2 / 16), rtol=1e-5
    )


def test_defaults_cover_every_parameter_of_the_flaxlab_vision_models():
    vit = pytest.importorskip("flaxlab.models.vit")
    from flax import nnx

    config = vit.ViTConfig.variant("Ti/16", num_classes=10)
    params = nnx.state(nnx.eval_shape(lambda: vit.ViT(config, rngs=nnx.Rngs(0))), nnx.Param)
    table = amos_param_table(params, default_eta_fn, default_shape_fn, momentum=0.9)
    assert "posemb" in table and "(1, 1, 1, 192)" in table  # patch-embedding conv slot
    state = jax.eval_shape(amos_with_defaults(0.01).init, params)
    v = unpack_slots(state.v, params, default_shape_fn)
    tokens = params["posemb"].shape[1]
    assert v["posemb"].shape == (1, tokens, 1)


# ----------------------------------------------------------------------------- rules files


def test_rules_file_json_and_toml_give_the_same_ordered_rules(tmp_path):
    from flaxlab.optim import load_rules_file

    (tmp_path / "r.json").write_text(
        '{".*head/kernel": {"eta": 0.01}, ".*fc1/kernel": {"eta": "sqrt(1 / SHAPE[0])",'
        ' "shape": "(1, SHAPE[-1])"}, ".*bias": {"shape": [1]}}'
    )
    (tmp_path / "r.toml").write_text(
        '[".*head/kernel"]\neta = 0.01\n[".*fc1/kernel"]\neta = "sqrt(1 / SHAPE[0])"\n'
        'shape = "(1, SHAPE[-1])"\n[".*bias"]\nshape = [1]\n'
    )
    for name in ("r.json", "r.toml"):
        eta, shape = load_rules_file(tmp_path / name)
        assert list(eta) == [".*head/kernel", ".*fc1/kernel"]
        assert shape == {".*fc1/kernel": "(1, SHAPE[-1])", ".*bias": (1,)}
        eta_fn = with_overrides(eta, default_eta_fn)
        assert eta_fn(("mlp", "fc1", "kernel"), (16, 8)) == pytest.approx(0.25)
        assert eta_fn(("head", "kernel"), (16, 8)) == 0.01
        assert eta_fn(("norm", "scale"), (16,)) == default_eta_fn(("norm", "scale"), (16,))


@pytest.mark.parametrize(
    "text, match",
    [
        ('{".*": {"eta": "__import__(1)"}}', "calls '__import__'; accepted functions"),
        ('{".*": {"speed": 1}}', "expected a table with 'eta' and/or 'shape'"),
        ('{"(": {"eta": 1}}', "not a valid regex"),
        ("[1, 2]", "must map name patterns"),
        ("{nope", "is not readable"),
    ],
)
def test_bad_rules_files_fail_in_one_line_naming_the_file(tmp_path, text, match):
    from flaxlab.optim import load_rules_file

    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        load_rules_file(path)
    assert "rules.json" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no such file"):
        load_rules_file(tmp_path / "missing.toml")
