"""``flaxlab export``: a run's model as a T5X checkpoint or an official .npz, read back through
``init.checkpoint`` with the very bits saved."""

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from flaxlab.cli import app
from flaxlab.configs import get_preset
from flaxlab.train import Estimator
from flaxlab.train.export import model_tree
from flaxlab.train.t5x import decode_msgpack, load_t5x
from tests.train.tiny import TINY

runner = CliRunner()
SETTINGS = TINY + ["train.steps=4", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export") / "run"
    estimator = Estimator(get_preset("vit-digits", SETTINGS), workdir, progress=False)
    estimator.train()
    return workdir, model_tree(estimator.restore_model())


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def assert_same_bits(got, want):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def initial_params(tmp_path, checkpoint):
    config = get_preset("vit-digits", SETTINGS + [f"init.checkpoint={checkpoint}"])
    estimator = Estimator(config, tmp_path / "fresh", progress=False)
    params = jax.device_get(estimator.initial_state()["params"])
    from flax import nnx

    return model_tree(nnx.merge(estimator.graphdef, params, estimator.init_state()["rest"]))


def test_t5x_export_round_trip_is_exact(run, tmp_path):
    workdir, want = run
    out = tmp_path / "t5x"
    result = runner.invoke(app, ["export", str(workdir), str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(out / "checkpoint_4"))
    # T5X's layout: a msgpack tree {optimizer: {target, state: {step}}, version}, the
    # large arrays in tensorstore directories named by their dotted path.
    tree = decode_msgpack((out / "checkpoint_4" / "checkpoint").read_bytes())
    assert set(tree) == {"optimizer", "version"}
    assert set(tree["optimizer"]) == {"target", "state"}
    assert int(np.asarray(tree["optimizer"]["state"]["step"])) == 4
    assert any(p.name.startswith("target.") for p in (out / "checkpoint_4").iterdir())
    assert_same_bits(load_t5x(out)["target"], want)  # the EMA weights, as evaluation uses
    assert_same_bits(initial_params(tmp_path, out), want)
    # A second export to the same place changes nothing and says so.
    before = (out / "checkpoint_4" / "checkpoint").read_bytes()
    again = runner.invoke(app, ["export", str(workdir), str(out)])
    assert again.exit_code == 2 and "exists already" in again.output
    assert (out / "checkpoint_4" / "checkpoint").read_bytes() == before


def test_npz_export_round_trip_and_bad_formats(run, tmp_path):
    workdir, want = run
    out = tmp_path / "vit.npz"
    result = runner.invoke(app, ["export", str(workdir), str(out), "--format", "npz"])
    assert result.exit_code == 0, result.output
    assert_same_bits(initial_params(tmp_path, out), want)
    bad = runner.invoke(app, ["export", str(workdir), str(tmp_path / "x"), "--format", "onnx"])
    assert bad.exit_code == 2
    assert "--format 'onnx' is not supported; accepted: ['t5x', 'npz']" in bad.output
    bad = runner.invoke(app, ["export", str(workdir), str(tmp_path / "x.bin"), "--format", "npz"])
    assert bad.exit_code == 2 and "writes an .npz file" in bad.output


def test_training_from_the_export_through_the_cli(run, tmp_path):
    workdir, _ = run
    out = tmp_path / "t5x"
    assert runner.invoke(app, ["export", str(workdir), str(out)]).exit_code == 0
    args = ["train", "vit-digits", "--workdir", str(tmp_path / "tuned")]
    for s in TINY + ["train.steps=2", f"init.checkpoint={out}"]:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("test accuracy: ")
