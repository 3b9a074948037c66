import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlab.configs import get_preset
from flaxlab.train import (
    Checkpointer,
    CheckpointError,
    Estimator,
    TrainingError,
    Workdir,
    WorkdirMismatchError,
)
from flaxlab.train.metrics import read_jsonl
from tests.train.tiny import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "vit"
    estimator = Estimator(get_preset("vit-digits", TINY), workdir, progress=False)
    final = estimator.train()
    return workdir, estimator, final


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_training_writes_metrics_checkpoints_curves_and_status(trained):
    workdir, _, final = trained
    assert final["count"] == 360 and 0.0 <= final["accuracy"] <= 1.0
    records = read_jsonl(workdir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [3, 6, 9, 12]
    assert records[-1] == {"step": 12, "split": "eval", **final}
    for key in ("loss", "accuracy", "grad_norm", "learning_rate"):
        assert key in records[0]
    assert "steps_per_second" not in records[0] and records[1]["steps_per_second"] > 0
    assert Checkpointer(workdir / "checkpoints", read_only=True).steps() == [4, 8, 12]
    assert (workdir / "curves.png").stat().st_size > 5000
    status = json.loads((workdir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 12
    config = json.loads((workdir / "config.json").read_text())
    assert config["family"] == "vit" and config["model"]["hidden_size"] == 16


def test_training_again_on_a_finished_run_changes_nothing(trained):
    workdir, estimator, final = trained
    before = read_jsonl(workdir / "metrics.jsonl")
    again = Estimator(estimator.config, workdir, progress=False).train()
    assert again == final
    assert read_jsonl(workdir / "metrics.jsonl") == before


def test_evaluate_and_predict(trained, tmp_path):
    workdir, estimator, final = trained
    step, metrics = estimator.evaluate()
    assert step == 12 and metrics == pytest.approx(final)
    step, _ = estimator.evaluate(step=4)
    assert step == 4
    path = estimator.predict(estimator.config.data, tmp_path / "p.npz")
    with np.load(path) as p:
        assert p["prediction"].shape == (360,) and p["probabilities"].shape == (360, 10)
        assert np.mean(p["prediction"] == p["label"]) == pytest.approx(final["accuracy"])
        np.testing.assert_allclose(p["probabilities"].sum(1), 1.0, rtol=1e-5)


def test_watch_evaluates_every_checkpoint_and_keeps_the_best(trained, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained[0], workdir)
    estimator = Estimator(trained[1].config, workdir, progress=False)
    results = estimator.watch(poll_seconds=0.05, timeout_seconds=5)
    assert [s for s, _ in results] == [4, 8, 12]  # the first checkpoint too
    assert [r["step"] for r in read_jsonl(workdir / "eval.jsonl")][-3:] == [4, 8, 12]
    index = json.loads((workdir / "best" / "best.json").read_text())
    top = max(results, key=lambda r: r[1]["accuracy"])
    assert index["evaluated"] == [4, 8, 12]
    assert len(index["best"]) == 1 and index["best"][0]["step"] == top[0]
    assert (workdir / "best" / str(top[0])).is_dir()
    assert estimator.watch(poll_seconds=0.05, timeout_seconds=1) == []  # nothing new


def test_damaged_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained[0], workdir)
    for f in (workdir / "checkpoints" / "12" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (workdir / "checkpoints" / "16.orbax-checkpoint-tmp-1").mkdir()  # a killed save
    estimator = Estimator(trained[1].config, workdir, progress=False)
    step, _ = estimator.evaluate()
    assert step == 8
    with pytest.raises(CheckpointError, match="checkpoints/12 is unreadable"):
        estimator.evaluate(step=12)


def test_workdir_of_another_model_is_refused_untouched(trained, tmp_path):
    workdir = trained[0]
    before = tree_digest(workdir)
    other = get_preset("vit-digits", TINY + ["model.hidden_size=32"])
    with pytest.raises(WorkdirMismatchError, match="model.hidden_size: 16 there, 32 here"):
        Estimator(other, workdir, progress=False).train()
    mixer = get_preset("mixer-digits", ["train.steps=2"])
    with pytest.raises(WorkdirMismatchError, match="family: 'vit' there, 'mixer' here"):
        Estimator(mixer, workdir, progress=False).train()
    assert tree_digest(workdir) == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("precious")
    with pytest.raises(WorkdirMismatchError, match="not empty and holds no flaxlab run"):
        Estimator(other, stranger, progress=False).train()
    assert (stranger / "thesis.tex").read_text() == "precious"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = get_preset("vit-digits", TINY)
    estimator = Estimator(config, tmp_path / "nan", progress=False)
    real_step = estimator.make_train_step()

    def poisoned(state, batch):
        step = int(state["step"])
        new_state, metrics = real_step(state, batch)
        if step + 1 >= 7:
            metrics = dict(metrics, loss=jnp.float32(jnp.nan))
        return new_state, metrics

    estimator.train_step = poisoned
    with pytest.raises(
        TrainingError,
        match=r"loss is nan at step 7; the last good checkpoint "
        r"\(step 4\) is kept",
    ):
        estimator.train()
    assert Checkpointer(tmp_path / "nan" / "checkpoints", read_only=True).steps() == [4]
    assert json.loads((tmp_path / "nan" / "status.json").read_text())["state"] == "failed"


def test_warm_start_takes_parameters_and_optionally_the_optimizer(trained, tmp_path):
    workdir, estimator, _ = trained
    _, trained_state = estimator.restore_state()
    for keep_optimizer in (False, True):
        config = get_preset(
            "vit-digits",
            TINY + [f"train.warm_start={workdir}", f"train.warm_start_optimizer={keep_optimizer}"],
        )
        fresh = Estimator(config, tmp_path / f"warm{keep_optimizer}", progress=False)
        state = fresh.warm_start(fresh.init_state())
        jax.tree.map(np.testing.assert_array_equal, state["params"], trained_state["params"])
        adam_count = [x for x in jax.tree.leaves(state["opt_state"]) if x.dtype == jnp.int32]
        assert int(adam_count[0]) == (12 if keep_optimizer else 0)
    bad = get_preset("vit-digits", TINY + [f"train.warm_start={tmp_path / 'none'}"])
    with pytest.raises(TrainingError, match="no such checkpoint folder"):
        Estimator(bad, tmp_path / "w", progress=False).train()


# EMA warm-up: decay_t = min(0.5, (1 + t) / (10 + t)) = 0.1 at t = 0, 2/11 at t = 1.
D0, D1 = 0.1, 2.0 / 11.0


def test_gradient_accumulation_equals_one_big_batch_and_ema(tmp_path):
    states = {}
    for accum in (1, 2):
        config = get_preset(
            "vit-digits", TINY + [f"optimizer.grad_accum_steps={accum}", "train.ema_decay=0.5"]
        )
        estimator = Estimator(config, tmp_path / str(accum), progress=False)
        from flaxlab.data.factory import make_data
        from flaxlab.train import sharding

        batches, _ = make_data(config.data)
        step_fn = estimator.make_train_step()
        state = estimator.init_state()
        p0 = jax.tree.map(np.asarray, state["params"])
        state, _ = step_fn(state, sharding.shard_batch(batches(0), estimator.mesh))
        p1 = jax.tree.map(np.asarray, state["params"])
        state, _ = step_fn(state, sharding.shard_batch(batches(1), estimator.mesh))
        states[accum] = jax.tree.map(np.asarray, state)
        ema = jax.tree.map(
            lambda a, b, c: D1 * (D0 * a + (1 - D0) * b) + (1 - D1) * c,
            p0,
            p1,
            states[accum]["params"],
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), states[accum]["ema"], ema
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        states[1]["params"],
        states[2]["params"],
    )


def test_tensorboard_events_hold_every_metrics_record(tmp_path):
    # The legacy loader yields the events as written (the other migrates scalars to tensors).
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    workdir = tmp_path / "tb"
    overrides = TINY + ["train.tensorboard=true", "train.steps=6", "train.checkpoint_every=6"]
    Estimator(get_preset("vit-digits", overrides), workdir, progress=False).train()
    files = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = {}
    for event in LegacyEventFileLoader(str(files[0])).Load():
        for value in event.summary.value:
            events[(event.step, value.tag)] = value.simple_value
    expected = {
        (r["step"], f"{r['split']}/{k}"): v
        for r in read_jsonl(workdir / "metrics.jsonl")
        for k, v in r.items()
        if k not in ("step", "split")
    }
    assert set(events) == set(expected) and ("train/loss" in {t for _, t in events})
    for key, value in expected.items():
        assert events[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_task_can_keep_parameters_out_of_gradient_clipping(tmp_path):
    """With a task's ``gradient_clip_mask``, only the masked-in gradients are measured and
    clipped (VDM keeps its schedule shape's variance gradient out); the rest step unclipped."""
    from flaxlab.data.factory import make_data
    from flaxlab.train import sharding

    plain = [
        "optimizer.name=sgd",
        "optimizer.sgd.momentum=0",
        "optimizer.weight_decay=0",
        "optimizer.warmup_steps=0",
        "optimizer.decay=constant",
        "optimizer.learning_rate=1.0",
    ]

    def head_unclipped(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "head" not in jax.tree_util.keystr(path), params
        )

    deltas, norms = {}, {}
    for name, clip, mask in (("raw", "none", None), ("masked", "0.001", head_unclipped)):
        config = get_preset("vit-digits", TINY + plain + [f"optimizer.grad_clip_norm={clip}"])
        estimator = Estimator(config, tmp_path / name, progress=False)
        if mask is not None:
            estimator.task.gradient_clip_mask = mask
        batches, _ = make_data(config.data)
        state = estimator.init_state()
        # The head starts at zero (so would every other gradient): give it weights.
        state["params"] = jax.tree_util.tree_map_with_path(
            lambda path, x: (
                x
                + ("head" in jax.tree_util.keystr(path))
                * jax.random.normal(jax.random.key(1), x.shape)
            ),
            state["params"],
        )
        p0 = jax.tree.map(np.asarray, state["params"])
        state, metrics = estimator.make_train_step()(
            state, sharding.shard_batch(batches(0), estimator.mesh)
        )
        deltas[name] = jax.tree.map(lambda a, b: np.asarray(a) - b, state["params"], p0)
        norms[name] = float(metrics["grad_norm"])
    clipped = head_unclipped(deltas["raw"])
    leaves = jax.tree_util.tree_leaves_with_path(deltas["raw"])
    in_norm = np.sqrt(
        sum(np.sum(np.square(d)) for (_, d), m in zip(leaves, jax.tree.leaves(clipped)) if m)
    )
    np.testing.assert_allclose(norms["masked"], in_norm, rtol=1e-3)
    assert norms["raw"] > norms["masked"]  # the head's gradient is left out of the norm
    scale = 0.001 / in_norm
    assert scale < 0.1  # the clipping is active
    for (path, raw), got, m in zip(
        leaves, jax.tree.leaves(deltas["masked"]), jax.tree.leaves(clipped)
    ):
        want = raw * scale if m else raw
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7, err_msg=str(path))
    assert not all(jax.tree.leaves(clipped)) and any(jax.tree.leaves(clipped))


def test_run_saved_before_a_model_field_existed_still_matches(tmp_path):
    """A config.json from an older version lacks fields added since: they take their defaults
    (so the run resumes), and a missing field whose value here is not the default is refused."""
    import dataclasses

    config = get_preset("vit-digits", TINY)
    Workdir(tmp_path).prepare(config)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(type(config.model))}
    same = next(k for k, v in saved["model"].items() if defaults.get(k) == v)
    del saved["model"][same]
    path.write_text(json.dumps(saved))
    Workdir(tmp_path).prepare(config)  # no error
    assert same in json.loads(path.read_text())["model"]  # rewritten with the field
    saved = json.loads(path.read_text())
    del saved["model"]["hidden_size"]  # 16 here, not the default
    path.write_text(json.dumps(saved))
    with pytest.raises(WorkdirMismatchError, match="model.hidden_size"):
        Workdir(tmp_path).prepare(config)


def test_the_model_restores_whatever_the_optimizer_state_layout(trained):
    """Evaluation, prediction and sampling read only the model items: a run restores under an
    optimizer whose state is laid out differently (here SGD for a run trained with AdamW)."""
    workdir = trained[0]
    config = get_preset("vit-digits", TINY)
    sgd = get_preset("vit-digits", TINY + ["optimizer.name=sgd"])
    want = nnx.state(Estimator(config, workdir, progress=False).restore_model(), nnx.Param)
    got = nnx.state(Estimator(sgd, workdir, progress=False).restore_model(), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, got, want)
