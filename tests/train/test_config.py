import json
from pathlib import Path

import pytest

from flaxlab.configs import describe_presets, get_preset
from flaxlab.train import apply_overrides, from_dict, migrate, to_dict


def test_presets_round_trip_through_json():
    for name in describe_presets():
        config = get_preset(name)
        assert from_dict(json.loads(json.dumps(to_dict(config)))) == config


def test_overrides_parse_each_type():
    c = apply_overrides(
        get_preset("vit-digits"),
        [
            "train.steps=7",
            "optimizer.learning_rate=0.5",
            "data.flip=true",
            "model.representation_size=12",
            "optimizer.grad_clip_norm=none",
            "model.patch_size=4,4",
            "model.attention.dropout_rate=0.1",
            "train.warm_start=/x/y",
        ],
    )
    assert c.train.steps == 7 and c.optimizer.learning_rate == 0.5 and c.data.flip is True
    assert c.model.representation_size == 12 and c.optimizer.grad_clip_norm is None
    assert c.model.patch_size == (4, 4) and c.model.attention.dropout_rate == 0.1
    assert c.train.warm_start == "/x/y"


def test_augreg_none_is_the_papers_setting_and_null_unsets_it():
    paper = get_preset("vit-digits", ["data.augreg=none"]).data
    assert paper.augreg == "none" and paper.inception_crop and paper.flip
    assert paper.randaug_layers == 0 and paper.mixup_alpha == 0.0
    unset = get_preset("vit-digits", ["data.augreg=null"]).data
    assert unset.augreg is None and not unset.inception_crop and not unset.flip
    # Elsewhere "none" still unsets an optional field.
    assert (
        get_preset("vit-digits", ["optimizer.grad_clip_norm=none"]).optimizer.grad_clip_norm is None
    )


def test_unknown_field_names_the_nearest_valid_ones():
    with pytest.raises(ValueError, match=r"unknown field 'train.stepz'; did you mean train.steps"):
        get_preset("vit-digits", ["train.stepz=3"])
    with pytest.raises(ValueError, match=r"unknown field 'model.hiden_size'.*model.hidden_size"):
        get_preset("vit-digits", ["model.hiden_size=3"])
    with pytest.raises(ValueError, match=r"unknown field 'modle'; did you mean model"):
        get_preset("vit-digits", ["modle.x=1"])


def test_wrongly_typed_value_names_the_expected_type():
    with pytest.raises(ValueError, match=r"train.steps='ten': expected an int"):
        get_preset("vit-digits", ["train.steps=ten"])
    with pytest.raises(ValueError, match=r"data.flip='maybe': expected a bool"):
        get_preset("vit-digits", ["data.flip=maybe"])
    with pytest.raises(ValueError, match=r"optimizer.learning_rate='fast': expected a float"):
        get_preset("vit-digits", ["optimizer.learning_rate=fast"])
    with pytest.raises(ValueError, match="must look like field.path=value"):
        get_preset("vit-digits", ["train.steps"])


def test_values_are_validated():
    with pytest.raises(ValueError, match=r"optimizer.name='adam'.*'adamw'"):
        get_preset("vit-digits", ["optimizer.name=adam"])
    with pytest.raises(ValueError, match=r"train.steps=0 must be >= 1"):
        get_preset("vit-digits", ["train.steps=0"])
    with pytest.raises(ValueError, match=r"not divisible by optimizer.grad_accum_steps=3"):
        get_preset("vit-digits", ["optimizer.grad_accum_steps=3"])
    with pytest.raises(ValueError, match=r"unknown preset 'vit-digit'; did you mean vit-digits"):
        get_preset("vit-digit")


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("preset", ["vit-digits", "vdm-digits", "performer-lm-stdlib"])
def test_version_1_config_files_migrate_to_the_same_experiment(preset):
    """config.json written by flaxlab 0.1 (flat optimizer fields, task as a name, task
    settings under train) reads back as the experiment it described."""
    old = json.loads((DATA / f"config_v1_{preset}.json").read_text())
    assert "version" not in old and isinstance(old["task"], str)
    # What the presets were when the files were written (vit-digits has changed since).
    then = {"vit-digits": ["model.posemb_init=normal", "train.steps=2000"]}.get(preset, [])
    then += ["optimizer.learning_rate=3e-3"] if preset == "vit-digits" else []
    want = get_preset(preset, ["optimizer.name=amos", "optimizer.amos.momentum=0.5", *then])
    assert from_dict(old) == want
    assert migrate(old)["version"] == 2 and to_dict(want)["version"] == 2
    assert from_dict(to_dict(want)) == want


def test_version_1_task_settings_the_task_lacks_are_refused_unless_default():
    old = json.loads((DATA / "config_v1_vdm-digits.json").read_text())
    old["train"]["label_smoothing"] = 0.2
    with pytest.raises(ValueError, match="train.label_smoothing=0.2.*family 'vdm'"):
        from_dict(old)


def test_task_settings_are_overridden_under_task():
    c = get_preset("vit-digits", ["task.label_smoothing=0.2", "optimizer.adamw.b2=0.95"])
    assert c.task.label_smoothing == 0.2 and c.optimizer.adamw.b2 == 0.95
    with pytest.raises(ValueError, match=r"unknown field 'task.label_smoothin'"):
        get_preset("vit-digits", ["task.label_smoothin=0.2"])
    with pytest.raises(ValueError, match=r"task.label_smoothing=1.5 must be in \[0, 1\)"):
        get_preset("vit-digits", ["task.label_smoothing=1.5"])
    with pytest.raises(ValueError, match=r"'optimizer.momentum' is now 'optimizer.sgd.momentum'"):
        get_preset("vit-digits", ["optimizer.momentum=0.5"])
    with pytest.raises(ValueError, match=r"'train.label_smoothing' is now 'task.label_smoothing'"):
        get_preset("vit-digits", ["train.label_smoothing=0.5"])
