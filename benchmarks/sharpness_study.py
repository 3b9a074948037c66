"""AdamW vs SAM vs GSAM on a small ViT and a small MLP-Mixer (digits, no augmentation).

Each (model, optimizer) pair trains ``Study.seeds`` times through :class:`flaxlab.train.Estimator`
(the ``vit-digits`` / ``mixer-digits`` presets with ``data.crop_padding=0``, the ViT with the
reference's N(0, 0.02) position embedding; seed ``s`` sets
``train.seed`` and ``data.seed``; the digits' train/test split is fixed). At the final weights,
on a fixed batch of 512 training images in evaluation mode: the top Hessian eigenvalue of the
training objective (the presets' label-smoothed cross-entropy) by power iteration on
Hessian-vector products (``jax.jvp`` of ``jax.grad``), with its convergence, and the surrogate
gap ``f(w + rho g/||g||) - f(w)`` at one radius for every run. Also: test accuracy (360
held-out images), the loss on the whole training set, and each optimizer's train-step time over
AdamW's, timed in this process after compilation, the optimizers interleaved in rounds.

Radii: SAM ``rho = 0.05`` constant (Foret et al.'s default). GSAM: the reference's ViT recipe
(big_vision ``vit_i1k_gsam_no_aug``: rho 0.6 -> 0.1 following the learning rate, alpha 0.6)
with both radii scaled by ``||w_init||`` of the digits ViT over ViT-B/32's, since rho is an
absolute length in parameter space. The power iteration is first checked on a quadratic with a
known Hessian against ``numpy.linalg.eigvalsh`` in float64.

Run: ``python benchmarks/sharpness_study.py`` (writes benchmarks/results/sharpness_study.json
and .md and docs/sharpness_study.png); ``--quick`` for a seconds-long smoke run (.quick outputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

# ||w|| at initialisation of flaxlab's ViT-B/32 (1000 classes, nnx.Rngs(0)), measured once
# (initialising 88M parameters takes ~20 s); the reference's GSAM radii are for that model.
VIT_B32_INIT_NORM = 293.86
REFERENCE_GSAM = {"rho_max": 0.6, "rho_min": 0.1, "alpha": 0.6}
SAM_RHO = 0.05
GAP_RHO = 0.05  # the common radius of the final surrogate-gap measurement
MODELS = {"vit": "vit-digits", "mixer": "mixer-digits"}
# The models as the papers train them: the ViT with the reference's N(0, 0.02) position
# embedding (the vit-digits preset now starts it from a sine-cosine table).
MODEL_OVERRIDES = {"vit": ["model.posemb_init=normal"], "mixer": []}


@dataclasses.dataclass(frozen=True)
class Study:
    steps: int = 1000
    seeds: int = 3
    log_every: int = 50
    probe_batch: int = 512
    power_iterations: int = 30
    models: tuple[str, ...] = ("vit", "mixer")
    timing_rounds: int = 7
    timing_steps: int = 20


QUICK = Study(20, 1, log_every=10, probe_batch=64, power_iterations=5, timing_rounds=2)
QUICK = dataclasses.replace(QUICK, timing_steps=3, models=("vit",))

# ------------------------------------------------------------------------------------------
# Hessian power iteration and the surrogate gap (functions of any loss_fn(params, *args))


def _dot(a, b) -> jax.Array:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jnp.asarray(sum(jnp.vdot(x, y) for x, y in pairs))


@functools.partial(jax.jit, static_argnums=0)
def _power_step(loss_fn, params, v, shift, *args):
    """One power iteration on ``H - shift I`` from the unit vector ``v``, with ``H v`` the
    Hessian-vector product of ``loss_fn(params, *args)`` (forward over reverse: ``jax.jvp`` of
    ``jax.grad``): ``(Av / ||Av||, <v, Av>, ||Av - <v, Av> v|| / |<v, Av>|)``."""
    grad = lambda p: jax.grad(loss_fn)(p, *args)  # noqa: E731
    av = jax.tree.map(lambda h, x: h - shift * x, jax.jvp(grad, (params,), (v,))[1], v)
    rayleigh = _dot(v, av)
    error = jax.tree.map(lambda h, x: h - rayleigh * x, av, v)
    norm = jnp.sqrt(_dot(av, av))
    return jax.tree.map(lambda x: x / norm, av), rayleigh, jnp.sqrt(_dot(error, error)) / norm


def _power_iteration(loss_fn, params, args, iterations: int, seed: int, shift: float) -> dict:
    flat, unravel = ravel_pytree(params)
    start = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
    v, history, residual = unravel(start / jnp.linalg.norm(start)), [], float("nan")
    for _ in range(iterations):
        v, rayleigh, residual = _power_step(loss_fn, params, v, shift, *args)
        history.append(float(rayleigh) + shift)
    change = abs(history[-1] - history[-2]) / abs(history[-1]) if len(history) > 1 else None
    found = dict(eigenvalue=history[-1], history=history, last_relative_change=change)
    return dict(found, residual=float(residual), shift=shift)


def top_hessian_eigenvalue(loss_fn, params, *args, iterations=20, seed=0) -> dict[str, Any]:
    """The top Hessian eigenvalue of ``loss_fn(params, *args)`` by power iteration from a
    Gaussian start, with the Rayleigh quotient of every iteration (``history``), the last
    relative change and the residual ``||Hv - l v|| / ||Hv||``.

    Power iteration finds the eigenvalue of largest magnitude, at the rate of the ratio of the
    two largest magnitudes; when that is negative (``negative_eigenvalue``), it runs again on
    ``H - l I``, whose largest eigenvalue is the top one minus ``l``."""
    found = _power_iteration(loss_fn, params, args, iterations, seed, 0.0)
    if found["eigenvalue"] < 0:
        negative = found["eigenvalue"]
        found = _power_iteration(loss_fn, params, args, iterations, seed, negative)
        found["negative_eigenvalue"] = negative
    return found


@functools.partial(jax.jit, static_argnums=0)
def surrogate_gap(loss_fn, params, rho, *args):
    """``f(w + rho g / ||g||) - f(w)`` (SAM's first-order worst case at radius ``rho``) and
    ``||g||``."""
    loss, grads = jax.value_and_grad(loss_fn)(params, *args)
    norm = jnp.sqrt(_dot(grads, grads))
    perturbed = jax.tree.map(lambda w, g: w + rho * g / (norm + 1e-12), params, grads)
    return loss_fn(perturbed, *args) - loss, norm


def check_power_iteration(iterations: int = 30) -> dict:
    """The power iteration on ``0.5 x^T A x`` over a two-leaf pytree (A symmetric with a known
    spectrum) against ``numpy.linalg.eigvalsh`` in float64, for a spectrum whose largest
    magnitude is the top eigenvalue and for one where it is negative; raises on disagreement."""
    rng = np.random.default_rng(0)
    n = 14
    basis, _ = np.linalg.qr(rng.normal(size=(n, n)))
    params = {"a": jnp.ones((3, 2)), "b": jnp.asarray(rng.normal(size=(n - 6,)), jnp.float32)}
    quadratic = lambda p, a: 0.5 * ravel_pytree(p)[0] @ a @ ravel_pytree(p)[0]  # noqa: E731
    out = {}
    for case, top in (("positive", [9.0, 6.0]), ("negative", [-9.0, 6.0])):
        spectrum = np.concatenate([top, rng.uniform(-3.0, 2.0, n - 2)])
        matrix = (basis * spectrum) @ basis.T  # float64
        expected = float(np.linalg.eigvalsh(matrix)[-1])
        a32 = jnp.asarray(matrix, jnp.float32)
        found = top_hessian_eigenvalue(quadratic, params, a32, iterations=iterations, seed=1)
        error = abs(found["eigenvalue"] - expected) / abs(expected)
        if not error < 1e-4:
            raise AssertionError(f"{case}: power iteration {found['eigenvalue']} vs {expected}")
        out[case] = dict(expected=expected, found=found["eigenvalue"], relative_error=error)
    return dict(out, iterations=iterations)


# ------------------------------------------------------------------------------------------
# training runs


def optimizer_arms(gsam_rho_max: float, gsam_rho_min: float) -> dict[str, list[str]]:
    gsam = [f"optimizer.rho_max={gsam_rho_max}", f"optimizer.rho_min={gsam_rho_min}"]
    gsam += [f"optimizer.alpha={REFERENCE_GSAM['alpha']}", "optimizer.sharpness=gsam"]
    sam = ["optimizer.sharpness=sam", f"optimizer.rho_max={SAM_RHO}"]
    return {"adamw": ["optimizer.sharpness=none"], "sam": sam, "gsam": gsam}


def config_for(model: str, arm: list[str], seed: int, study: Study):
    from flaxlab.configs import get_preset

    run = [f"train.steps={study.steps}", f"train.checkpoint_every={study.steps}"]
    run += [f"train.seed={seed}", f"data.seed={seed}", f"train.log_every={study.log_every}"]
    # No augmentation; one evaluation, at the end.
    fixed = [*MODEL_OVERRIDES[model], "data.crop_padding=0", "train.eval_every=0"]
    return get_preset(MODELS[model], [*run, *fixed, *arm])


def make_objective(estimator):
    """``loss(params, rest, images, targets)``: the training objective (the task's
    label-smoothed cross-entropy) of the estimator's model in evaluation mode."""
    graphdef = estimator.graphdef
    smoothing = estimator.config.task.label_smoothing

    def loss(params, rest, images, labels):
        logits = nnx.merge(graphdef, params, rest)(images, deterministic=True)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

    return loss


def tree_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def one_run(model, name, arm, seed, study, probe, train_set, objective_box):
    from flaxlab.train import Estimator
    from flaxlab.train.metrics import read_jsonl

    config = config_for(model, arm, seed, study)
    with tempfile.TemporaryDirectory() as tmp:
        estimator = Estimator(config, tmp, progress=False)
        start = time.perf_counter()
        final = estimator.train()
        seconds = time.perf_counter() - start
        _, state = estimator.restore_state(None, ("params", "extra"))
        assert state is not None
        records = [r for r in read_jsonl(estimator.run_dir.metrics_path) if r["split"] == "train"]
    # One objective per model, so that its jitted HVP and loss compile once.
    loss = objective_box.setdefault("loss", make_objective(estimator))
    jit_loss = objective_box.setdefault("jit_loss", jax.jit(loss))
    params, rest = state["params"], state["rest"]
    eig = top_hessian_eigenvalue(loss, params, rest, *probe, iterations=study.power_iterations)
    gap, grad_norm = surrogate_gap(loss, params, GAP_RHO, rest, *probe)
    train_loss = float(jit_loss(params, rest, *train_set))
    last = records[-1]
    run: dict[str, Any] = dict(model=model, optimizer=name, seed=seed, train_seconds=seconds)
    run.update(test_accuracy=final["accuracy"], test_loss=final["loss"], train_loss=train_loss)
    run.update(hessian=eig, top_eigenvalue=eig["eigenvalue"], param_norm=tree_norm(params))
    run.update(surrogate_gap=float(gap), probe_grad_norm=float(grad_norm))
    # The last logging window's means (the gap at the run's own radius, SAM/GSAM only).
    run.update(logged_train_loss=last["loss"], logged_rho=last.get("sharpness_rho"))
    return dict(run, logged_surrogate_gap=last.get("surrogate_gap")), estimator


def time_steps(estimators: dict, study: Study) -> dict:
    """Step time per optimizer (ms, median over rounds) of the trained estimators' jitted
    steps (compiled already) from fresh states, interleaved round by round on one batch."""
    from flaxlab.data.factory import make_data
    from flaxlab.train import sharding as shd

    steps, states, batches = {}, {}, {}
    for name, est in estimators.items():
        train_batches, _ = make_data(est.config.data)
        batches[name] = shd.shard_batch(train_batches(0), est.mesh)
        steps[name], states[name] = est.train_step, est.init_state()
        states[name], metrics = steps[name](states[name], batches[name])  # warm-up
        jax.block_until_ready(metrics)
    per_round = {name: [] for name in estimators}
    for _ in range(study.timing_rounds):
        for name in estimators:
            start = time.perf_counter()
            for _ in range(study.timing_steps):
                states[name], metrics = steps[name](states[name], batches[name])
            jax.block_until_ready((states[name], metrics))
            per_round[name].append(1e3 * (time.perf_counter() - start) / study.timing_steps)
    rounds = {name: np.asarray(t) for name, t in per_round.items()}
    median = {name: float(np.median(t)) for name, t in rounds.items()}
    ratios = {name: float(np.median(t / rounds["adamw"])) for name, t in rounds.items()}
    return {"ms_per_step_median": median, "ratio_vs_adamw": ratios, "per_round_ms": per_round}


def mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs, timing) -> dict:
    summary = {}
    for model in MODELS:
        for name in ("adamw", "sam", "gsam"):
            group = [r for r in runs if r["model"] == model and r["optimizer"] == name]
            if not group:
                continue
            keys = ("test_accuracy", "train_loss", "top_eigenvalue", "surrogate_gap", "param_norm")
            entry: dict[str, Any] = {k: mean_std([r[k] for r in group]) for k in keys}
            entry["ms_per_step"] = timing[model]["ms_per_step_median"][name]
            entry["cost_ratio"] = timing[model]["ratio_vs_adamw"][name]
            entry["runs"] = len(group)
            summary[f"{model}/{name}"] = entry
    return summary


def pm(pair, spec: str, scale: float = 1.0) -> str:
    return f"{scale * pair[0]:{spec}} +- {scale * pair[1]:{spec}}"


def markdown(result) -> str:
    s = result["settings"]
    check = result["power_iteration_check"]
    lines = ["# AdamW vs SAM vs GSAM on digits (no augmentation)", ""]
    lines += [f"Command: `{result['command']}`", "", f"Device: {result['device']}", ""]
    lines += [
        f"{s['steps']} steps of batch 64 (AdamW, lr 3e-3, 100 warm-up steps, cosine, weight "
        f"decay 0.05, clip 1.0, label smoothing 0.1: the presets' settings), no augmentation, "
        f"{s['seeds']} seeds. SAM: rho = {s['sam_rho']} constant. GSAM: rho "
        f"{s['gsam_rho_max']} -> {s['gsam_rho_min']} following the learning rate, alpha "
        f"{s['gsam_alpha']} (the reference's 0.6 -> 0.1 scaled by ||w_init|| of the digits ViT, "
        f"{s['vit_init_norm']:.1f}, over ViT-B/32's, {VIT_B32_INIT_NORM}).",
        "",
        f"Top Hessian eigenvalue (lambda_max): {s['power_iterations']} power iterations on "
        f"a fixed batch of {s['probe_batch']} training images, evaluation mode. Surrogate gap: "
        f"f(w + rho g/||g||) - f(w) on that batch at rho = {GAP_RHO} for every run. Train loss: "
        "the label-smoothed objective on all 1,437 training images (floor ~0.5 with smoothing "
        "0.1). Cost: median step-time ratio to AdamW over interleaved rounds, after "
        "compilation. Mean +- sample std over seeds.",
        "",
        "| model | optimizer | test accuracy (%) | train loss | lambda_max | surrogate gap "
        "| ms/step | cost vs AdamW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, e in result["summary"].items():
        cells = [*key.split("/"), pm(e["test_accuracy"], ".2f", 100), pm(e["train_loss"], ".4f")]
        cells += [pm(e["top_eigenvalue"], ".2f"), pm(e["surrogate_gap"], ".4f")]
        cells += [f"{e['ms_per_step']:.1f}", f"{e['cost_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    header = "model | optimizer | seed | test acc (%) | train loss | lambda_max | last rel. change"
    header += " | residual | gap | norm of w | logged gap (own rho) | train s"
    lines += ["", "Every run:", "", f"| {header} |", "|---" * 12 + "|"]
    maybe = lambda value, spec: "-" if value is None else f"{value:{spec}}"  # noqa: E731
    for r in result["runs"]:
        h = r["hessian"]
        cells = [r["model"], r["optimizer"], str(r["seed"]), f"{100 * r['test_accuracy']:.2f}"]
        shifted = "*" if "negative_eigenvalue" in h else ""
        cells += [f"{r['train_loss']:.4f}", f"{r['top_eigenvalue']:.2f}{shifted}"]
        cells += [maybe(h["last_relative_change"], ".1e"), f"{h['residual']:.2f}"]
        cells += [f"{r['surrogate_gap']:.4f}", f"{r['param_norm']:.1f}"]
        cells += [maybe(r["logged_surrogate_gap"], ".4f"), f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    shown = "; ".join(
        f"{k}: {c['found']:.6f} vs {c['expected']:.6f} (relative error {c['relative_error']:.1e})"
        for k, c in check.items()
        if k != "iterations"
    )
    lines += [
        "",
        "Power-iteration check on 0.5 x^T A x with known spectra (top eigenvalue also the "
        "largest magnitude, or a negative one larger in magnitude), against "
        f"numpy.linalg.eigvalsh in float64, {check['iterations']} iterations: {shown}. "
        "(*: the largest-magnitude eigenvalue was negative; the top one is from H - l I.)",
        "",
        f"Total wall time: {result['wall_seconds'] / 60:.1f} min. Figure: `{result['plot']}`.",
        "",
    ]
    return "\n".join(lines)


COLORS = {"adamw": "tab:gray", "sam": "tab:blue", "gsam": "tab:orange"}
MARKERS = {"vit": "o", "mixer": "s"}


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]  # every run
    for r in result["runs"]:
        style = dict(c=COLORS[r["optimizer"]], marker=MARKERS[r["model"]], s=45, alpha=0.85)
        ax.scatter(r["top_eigenvalue"], 100 * r["test_accuracy"], **style)
    for name, color in COLORS.items():  # legend entries
        ax.scatter([], [], c=color, label=name)
    for model, marker in MARKERS.items():
        ax.scatter([], [], c="white", edgecolors="black", marker=marker, label=model)
    ax.set_xscale("log")
    ax.set_xlabel("top Hessian eigenvalue (training loss, final weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    keys = list(result["summary"])
    x = np.arange(len(keys))
    colors = [COLORS[k.split("/")[1]] for k in keys]
    for ax, metric, label in [
        (axes[1], "surrogate_gap", f"surrogate gap at rho={GAP_RHO}"),
        (axes[2], "cost_ratio", "step time / AdamW's"),
    ]:
        values = np.asarray([np.reshape(result["summary"][k][metric], -1) for k in keys])
        errors = values[:, 1] if values.shape[1] > 1 else None
        ax.bar(x, values[:, 0], yerr=errors, color=colors, capsize=3)
        ax.set_xticks(x, [k.replace("/", "\n") for k in keys], fontsize=8)
        ax.set_ylabel(label)
    axes[2].axhline(2.0, color="black", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_data(study: Study):
    """(fixed probe batch, whole training set) as (images, labels) device arrays."""
    from flaxlab.data.pipeline import to_float_images
    from flaxlab.data.sources import load_digits

    train = load_digits("train")
    index = np.random.default_rng(1234).choice(len(train), study.probe_batch, replace=False)

    def as_arrays(i):
        return jnp.asarray(to_float_images(train.images[i])), jnp.asarray(train.labels[i])

    return as_arrays(index), as_arrays(np.arange(len(train)))


def init_norm(model: str) -> float:
    from flaxlab.configs import get_preset
    from flaxlab.train import make_task

    task = make_task(get_preset(MODELS[model], MODEL_OVERRIDES[model]))
    return tree_norm(nnx.state(task.init_model(nnx.Rngs(0)), nnx.Param))


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args(argv)
    study = QUICK if args.quick else Study()
    wall = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    check = check_power_iteration()
    print(f"power-iteration check: {check}", flush=True)
    vit_norm = init_norm("vit")
    scale = vit_norm / VIT_B32_INIT_NORM
    rho_max = float(f"{REFERENCE_GSAM['rho_max'] * scale:.2g}")
    rho_min = float(f"{REFERENCE_GSAM['rho_min'] * scale:.2g}")
    arms = optimizer_arms(rho_max, rho_min)
    settings = dict(dataclasses.asdict(study), sam_rho=SAM_RHO, gap_rho=GAP_RHO, overrides=arms)
    settings.update(gsam_rho_max=rho_max, gsam_rho_min=rho_min, gsam_alpha=REFERENCE_GSAM["alpha"])
    settings.update(reference_gsam=REFERENCE_GSAM, vit_b32_init_norm=VIT_B32_INIT_NORM)
    settings.update(vit_init_norm=vit_norm, mixer_init_norm=init_norm("mixer"))
    probe, train_set = probe_data(study)
    runs, timing = [], {}
    for model in study.models:
        objective_box, estimators = {}, {}
        for seed in range(study.seeds):
            for name, arm in arms.items():
                run, est = one_run(model, name, arm, seed, study, probe, train_set, objective_box)
                runs.append(run)
                estimators.setdefault(name, est)  # seed 0's, for the step timing
                keys = ("test_accuracy", "train_loss", "top_eigenvalue", "surrogate_gap")
                print(model, name, seed, *(f"{k} {run[k]:.4g}" for k in keys), flush=True)
        timing[model] = time_steps(estimators, study)
        print(f"{model} timing: {timing[model]['ratio_vs_adamw']}", flush=True)
    suffix = ".quick" if args.quick else ""
    png = DOCS / f"sharpness_study{suffix}.png"
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/sharpness_study.py", *given])
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
    device += f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs, "
    device += f"load average {load_at_start:.1f} at start"
    result: dict[str, Any] = dict(command=command, device=device, settings=settings)
    result.update(power_iteration_check=check)
    result.update(summary=summarize(runs, timing), timing=timing, runs=runs)
    result.update(plot=str(png.relative_to(ROOT)), wall_seconds=time.perf_counter() - wall)
    stem = RESULTS / f"sharpness_study{suffix}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png)
    Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
