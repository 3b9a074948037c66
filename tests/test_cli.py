"""End-to-end CLI tests on tiny settings: one per model family (train, eval, predict)."""

import json

import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from flaxlab.cli import app
from tests.train.tiny import TINY

runner = CliRunner()


def sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


MIXER_TINY = [
    "model.hidden_size=16",
    "model.num_blocks=1",
    "model.tokens_mlp_dim=8",
    "model.channels_mlp_dim=16",
] + TINY[4:]


VMOE_TINY = [
    "model.moe.layers=1",  # before num_layers: each override is validated as it is applied
    "model.num_layers=2",
    "model.moe.num_experts=2",
] + [s for s in TINY if not s.startswith("model.num_layers")]


FAVOR_VIT_TINY = TINY + ["model.attention.kind=favor", "model.attention.num_features=8"]


@pytest.mark.parametrize(
    "preset, tiny",
    [
        ("mixer-digits", MIXER_TINY),
        ("vmoe-digits", VMOE_TINY),
        ("vit-digits", FAVOR_VIT_TINY),  # Performer-ViT: FAVOR+ attention as a drop-in
    ],
)
def test_train_eval_predict(tmp_path, preset, tiny):
    workdir = tmp_path / preset
    result = runner.invoke(app, ["train", preset, "--workdir", str(workdir), *sets(tiny)])
    assert result.exit_code == 0, result.output
    assert "test accuracy:" in result.output
    assert result.output.strip().splitlines()[-1].startswith("test accuracy: ")  # the headline
    result = runner.invoke(app, ["eval", str(workdir), "--step", "8"])
    assert result.exit_code == 0 and "step 8: accuracy" in result.output, result.output
    result = runner.invoke(app, ["predict", str(workdir), "--data", "digits"])
    assert result.exit_code == 0, result.output
    with np.load(workdir / "predictions.npz") as p:
        assert p["prediction"].shape == (360,)
    images = (np.arange(3 * 64) % 256).astype(np.uint8).reshape(3, 8, 8, 1)
    np.savez(tmp_path / "mine.npz", image=images, label=np.array([1, 2, 3]))
    out = tmp_path / "mine_pred.npz"
    result = runner.invoke(
        app, ["predict", str(workdir), "--data", str(tmp_path / "mine.npz"), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    with np.load(out) as p:
        assert p["prediction"].shape == (3,)


def test_presets_lists_each_with_a_description():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    assert "vit-digits" in result.output and "mixer-digits" in result.output
    result = runner.invoke(app, ["show-config", "vit-digits", "--set", "train.steps=5"])
    assert result.exit_code == 0 and '"steps": 5' in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "vit-digits", "--set", "train.stepz=3"], "did you mean train.steps"),
        (["train", "vit-digits", "--set", "data.batch_size=big"], "expected an int"),
        (["train", "vit-digitz"], "unknown preset 'vit-digitz'"),
        (["eval", "/nonexistent/run"], "not a flaxlab work directory"),
        (["predict", "/nonexistent/run", "--data", "digits"], "not a flaxlab work directory"),
    ],
)
def test_bad_input_fails_with_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_wrong_image_shape_names_both_shapes(tmp_path):
    args = ["train", "vit-digits", "--workdir", str(tmp_path / "w")]
    result = runner.invoke(app, args + sets(TINY + ["model.image_size=16,16"]))
    assert result.exit_code == 2, result.output
    assert "[batch, 16, 16, 1]" in result.output and "got shape (32, 8, 8, 1)" in result.output


VDM_TINY = [
    "model.schedule_features=16",
    "model.width=8",
    "model.depth=1",
    "model.groups=4",
    "data.batch_size=16",
    "optimizer.warmup_steps=1",
    "train.steps=4",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.eval_every=0",
]


def test_vdm_train_then_sample(tmp_path):
    from PIL import Image

    workdir = tmp_path / "vdm"
    result = runner.invoke(app, ["train", "vdm-digits", "--workdir", str(workdir), *sets(VDM_TINY)])
    assert result.exit_code == 0, result.output
    assert "bpd" in result.output and "bpd_ci95" in result.output
    headline = result.output.strip().splitlines()[-1]
    assert headline.startswith("test bits/dim: ") and " +- " in headline, headline
    out = tmp_path / "grid.png"
    args = ["sample", str(workdir), "--num", "6", "--steps", "3", "--output", str(out)]
    result = runner.invoke(app, args + ["--sampler", "ddim"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as picture:
        assert picture.size[0] >= 8 * 3 and picture.mode == "L"
    result = runner.invoke(app, ["sample", str(tmp_path / "nope")])
    assert result.exit_code == 2


def test_vmoe_routing_changes_at_evaluation_time(tmp_path):
    workdir = tmp_path / "vmoe"
    result = runner.invoke(
        app, ["train", "vmoe-digits", "--workdir", str(workdir), *sets(VMOE_TINY)]
    )
    assert result.exit_code == 0, result.output
    records = [line for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert "moe1_dropped_fraction" in records[0] and "moe1_router_entropy" in records[0]
    assert "moe1_expert_load_0" in records[0] and "moe1_expert_load_1" in records[0]
    for k in ("1", "2"):
        args = ["eval", str(workdir), "--set", f"model.moe.num_selected_experts={k}"]
        result = runner.invoke(app, args + ["--set", "model.moe.capacity_factor=4.0"])
        assert result.exit_code == 0 and "accuracy" in result.output, result.output


def test_performer_lm_train_then_generate(tmp_path):
    workdir = tmp_path / "lm"
    tiny = [
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.mlp_dim=32",
        "model.num_layers=1",
        "model.seq_len=32",
        "model.attention.num_features=8",
        "data.seq_len=32",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        "train.steps=4",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    ]
    result = runner.invoke(
        app, ["train", "performer-lm-stdlib", "--workdir", str(workdir), *sets(tiny)]
    )
    assert result.exit_code == 0, result.output
    assert "bits_per_byte" in result.output
    assert result.output.strip().splitlines()[-1].startswith("validation bits per byte: ")
    args = ["generate", str(workdir), "--prompt", "def ", "--num-tokens", "12", "--seed", "3"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("def ") and first.output == runner.invoke(app, args).output
    result = runner.invoke(app, ["generate", str(workdir), "--num-tokens", "500"])
    assert result.exit_code == 2 and "exceeds the model's context" in result.output


def test_global_verbose_option_and_exit_status_of_a_failed_run(tmp_path):
    """-v is an option of the command itself (once, before the subcommand); a run that fails
    (here: a non-finite loss) exits 1, a usage error 2, each with one line."""
    workdir = tmp_path / "nan"
    overrides = TINY + ["optimizer.learning_rate=3e38", "optimizer.grad_clip_norm=none"]
    result = runner.invoke(
        app, ["-v", "train", "vit-digits", "--workdir", str(workdir)] + sets(overrides)
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "training stopped: the loss is nan" in lines[0], result.output
    result = runner.invoke(app, ["train", "vit-digits", "-v"])
    assert result.exit_code == 2  # -v belongs before the subcommand


def test_vit_finetune_from_an_official_checkpoint_on_an_image_folder(tmp_path):
    """The fine-tuning recipe end to end: a released-layout .npz (8x8 images, patch 4) is
    fine-tuned at 16x16 on a folder of two classes, then labels a folder without classes."""
    from PIL import Image

    from flaxlab.models import ViT, ViTConfig
    from flaxlab.models.pretrained import save_pretrained

    source = ViTConfig(
        num_classes=5,
        image_size=(8, 8),
        patch_size=(4, 4),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        mlp_dim=16,
    )
    checkpoint = save_pretrained(ViT(source, rngs=nnx.Rngs(0)), tmp_path / "ViT-tiny.npz")
    rng = np.random.default_rng(0)
    folder, unlabelled = tmp_path / "pets", tmp_path / "new"
    for name, shade in (("cat", 40), ("dog", 200)):
        (folder / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(shade + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    unlabelled.mkdir()
    for i, shade in enumerate((30, 220)):
        Image.fromarray(np.full((18, 18, 3), shade, np.uint8)).save(unlabelled / f"img{i}.png")
    workdir = tmp_path / "ft"
    settings = [
        f"init.checkpoint={checkpoint}",
        f"data.source=folder:{folder}",
        "data.image_size=16",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "optimizer.grad_accum_steps=2",
        "optimizer.warmup_steps=1",
        "train.steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.eval_every=0",
    ]
    result = runner.invoke(
        app, ["train", "vit-finetune", "--workdir", str(workdir), *sets(settings)]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["image_size"] == [16, 16] and config["model"]["num_classes"] == 2
    assert config["model"]["hidden_size"] == 16 and config["data"]["class_names"] == ["cat", "dog"]
    result = runner.invoke(app, ["predict", str(workdir), "--data", str(unlabelled)])
    assert result.exit_code == 0, result.output
    rows = (workdir / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,label,probability" and len(rows) == 3
    assert rows[1].split(",")[0].endswith("img0.png") and rows[1].split(",")[1] in ("cat", "dog")


def test_lit_digits_trains_its_image_tower_first_then_classifies_zero_shot(tmp_path):
    from PIL import Image

    from flaxlab.data import load_digits

    workdir = tmp_path / "lit"
    tiny = [
        "model.image.hidden_size=16",
        "model.image.num_layers=1",
        "model.image.num_heads=2",
        "model.image.mlp_dim=32",
        "model.text.hidden_size=16",
        "model.text.num_layers=1",
        "model.text.num_heads=2",
        "model.text.mlp_dim=32",
        "task.image_train_steps=4",
        "data.batch_size=16",
        "train.steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.eval_every=0",
    ]
    result = runner.invoke(app, ["train", "lit-digits", "--workdir", str(workdir), *sets(tiny)])
    assert result.exit_code == 0, result.output
    assert "training vit-digits in" in result.output  # the image tower, first
    assert (workdir / "image_tower" / "checkpoints").is_dir()
    assert result.output.strip().splitlines()[-1].startswith("zero-shot test accuracy: ")
    digit = load_digits("test").images[0, :, :, 0]
    Image.fromarray(digit).save(tmp_path / "digit.png")
    args = ["zeroshot", str(workdir), "--classes", "zero,one,two", "--image"]
    result = runner.invoke(app, args + [str(tmp_path / "digit.png"), "--top", "2"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"{tmp_path / 'digit.png'}: ") and line.count("%") == 2
    result = runner.invoke(app, args + [str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "does not exist" in result.output
