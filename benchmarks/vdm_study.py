"""VDM study on the bundled 8x8 digits: learned vs fixed schedule, sample quality vs steps.

Trains (unless ``--reuse DIR`` points at existing work directories ``DIR/learned``,
``DIR/fixed`` and ``DIR/classifier``) three runs through the estimator, exactly as the CLI does:

* ``flaxlab train vdm-digits --workdir DIR/learned``   (the preset's learned schedule)
* ``flaxlab train vdm-digits --workdir DIR/fixed --set model.schedule=fixed``
* ``flaxlab train mixer-digits --workdir DIR/classifier``  (the scoring classifier)

then measures

1. test bits/dim (95% interval) of both schedules after the same number of steps: the final
   ``eval`` record of each run, and the paired per-image difference learned - fixed with the
   same images, the same ``(t, eps)`` draws and the same key (``evaluate_bpd``, EMA weights);
2. sample quality of the learned-schedule model against the number of sampler steps, for the
   ancestral sampler and DDIM, scored by the Mixer classifier: mean max-probability
   (confidence), entropy of the predicted-class histogram (diversity; ``ln 10 = 2.303`` nats is
   a uniform spread over the ten digits) and the fraction of samples with confidence > 0.9.
   The same numbers for real test images are the reference row.

Writes benchmarks/results/vdm_study.{json,md}, docs/vdm_quality_vs_steps.png and the sample
grids docs/vdm_samples_ancestral.png, docs/vdm_samples_ddim.png (``.quick`` in the names for
``--quick``).

Usage:
  python benchmarks/vdm_study.py --reuse /tmp/vdmstudy     # study of finished runs
  python benchmarks/vdm_study.py --workdir /tmp/vdmstudy   # trains the runs first (long)
  python benchmarks/vdm_study.py --quick                   # smoke run (tiny training)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlab.configs import get_preset
from flaxlab.data.pipeline import to_float_images
from flaxlab.data.sources import load_digits
from flaxlab.models.classification import split_model_output
from flaxlab.models.vdm import evaluate_bpd, image_grid, sample
from flaxlab.train import Estimator, load_config
from flaxlab.train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
RUNS = {
    "learned": ("vdm-digits", []),
    "fixed": ("vdm-digits", ["model.schedule=fixed"]),
    "classifier": ("mixer-digits", []),
}
QUICK_STEPS = {"vdm-digits": 40, "mixer-digits": 300}
IDEAL_ENTROPY = math.log(10.0)


def train_runs(root: pathlib.Path, quick: bool, vdm_steps: int | None = None) -> dict[str, float]:
    """Trains the three runs into ``root/<name>``; returns the training seconds of each.

    ``vdm_steps`` shortens both VDM runs (same warm-up and cosine decay, over fewer steps).
    """
    seconds = {}
    for name, (preset, overrides) in RUNS.items():
        overrides = list(overrides)
        steps = QUICK_STEPS[preset] if quick else None
        if vdm_steps and preset == "vdm-digits":
            steps = vdm_steps
        if steps:
            overrides += [
                f"train.steps={steps}",
                f"train.eval_every={steps}",
                f"train.checkpoint_every={steps}",
                f"train.log_every={steps}",
            ]
        config = get_preset(preset, overrides)
        start = time.perf_counter()
        Estimator(config, root / name, progress=False).train()
        seconds[name] = time.perf_counter() - start
    return seconds


def final_eval(workdir: pathlib.Path, step: int | None = None) -> dict:
    """The last ``eval`` record of a run's metrics.jsonl (or the one at ``step``)."""
    records = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("split") == "eval"]
    if step is not None:
        records = [r for r in records if r["step"] == step]
    if not records:
        at = "" if step is None else f" at step {step}"
        raise ValueError(f"{workdir}/metrics.jsonl has no eval record{at}; is the run finished?")
    return records[-1]


def _restore(workdir: pathlib.Path, step: int | None = None):
    return Estimator(load_config(workdir), workdir, progress=False).restore_model(step)


def _per_image_bpd(model, images, key, num_draws: int, chunk: int = 120) -> np.ndarray:
    graphdef, state = nnx.split(model)

    @jax.jit
    def bpd(state, batch, key):
        return evaluate_bpd(nnx.merge(graphdef, state), batch, None, key, num_draws)["bpd"]

    out = []
    for i in range(0, images.shape[0], chunk):
        out.append(np.asarray(bpd(state, images[i : i + chunk], jax.random.fold_in(key, i))))
    return np.concatenate(out)


def mean_ci(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width ``z * std / sqrt(n)`` of its normal 95% interval."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


def compare_schedules(
    root: pathlib.Path, num_draws: int, step: int | None = None, seed: int = 0
) -> dict:
    """Final eval records of both runs, and the paired per-image difference learned - fixed."""
    images = load_digits("test").images
    key = jax.random.key(seed)
    out, per_image = {}, {}
    for name in ("learned", "fixed"):
        record = final_eval(root / name, step)
        model = _restore(root / name, record["step"])
        gamma_0, gamma_1 = (float(g) for g in model.schedule.endpoints())
        per_image[name] = _per_image_bpd(model, images, key, num_draws)
        paired_mean, paired_half = mean_ci(per_image[name])
        out[name] = {
            "step": int(record["step"]),
            "bpd": float(record["bpd"]),
            "bpd_ci95": float(record["bpd_ci95"]),
            "bpd_recon": float(record.get("bpd_recon", float("nan"))),
            "bpd_prior": float(record.get("bpd_prior", float("nan"))),
            "bpd_diff": float(record.get("bpd_diff", float("nan"))),
            "gamma_0": gamma_0,
            "gamma_1": gamma_1,
            "study_bpd": paired_mean,
            "study_bpd_ci95": paired_half,
        }
    diff_mean, diff_half = mean_ci(per_image["learned"] - per_image["fixed"])
    out["paired"] = {
        "learned_minus_fixed": diff_mean,
        "ci95": diff_half,
        "num_images": int(images.shape[0]),
        "num_draws": num_draws,
        "ratio": out["learned"]["study_bpd"] / out["fixed"]["study_bpd"],
    }
    return out


def classifier_scores(classifier, images_uint8: np.ndarray) -> dict:
    """Confidence, class-histogram entropy and fraction confident of uint8 images [N,8,8,1]."""
    logits, _ = split_model_output(
        classifier(jnp.asarray(to_float_images(np.asarray(images_uint8))), deterministic=True)
    )
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    top = probs.max(axis=1)
    counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    freq = counts / counts.sum()
    nonzero = freq[freq > 0]
    conf_mean, conf_half = mean_ci(top)
    return {
        "confidence": conf_mean,
        "confidence_ci95": conf_half,
        "class_entropy": float(-np.sum(nonzero * np.log(nonzero))),
        "frac_confident": float(np.mean(top > 0.9)),
        "class_counts": counts.tolist(),
        "predicted": probs.argmax(axis=1).tolist(),
    }


def quality_vs_steps(
    root: pathlib.Path,
    step_counts: list[int],
    samplers: list[str],
    num: int,
    step: int | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Classifier scores of ``num`` samples per (sampler, steps); returns rows and the samples
    of the largest step count per sampler (for the grids)."""
    model = _restore(root / "learned", step)
    classifier = _restore(root / "classifier")
    test = load_digits("test")
    reference = classifier_scores(classifier, test.images)
    reference["accuracy"] = float(np.mean(np.array(reference["predicted"]) == test.labels))
    rows, grids = [], {}
    for sampler in samplers:
        for steps in step_counts:
            start = time.perf_counter()
            images = np.asarray(sample(model, jax.random.key(seed), num, steps, sampler=sampler))
            seconds = time.perf_counter() - start
            scores = classifier_scores(classifier, images)
            rows.append({"sampler": sampler, "steps": steps, "seconds": seconds, **scores})
            print(
                f"{sampler:9s} {steps:5d} steps: conf {scores['confidence']:.3f} "
                f"entropy {scores['class_entropy']:.3f} frac>0.9 {scores['frac_confident']:.3f} "
                f"({seconds:.1f} s)",
                flush=True,
            )
            if steps == max(step_counts):
                grids[sampler] = (images, scores["predicted"])
    return {"reference_test_images": reference, "rows": rows}, grids


def write_grid(images: np.ndarray, path: pathlib.Path, columns: int = 16) -> None:
    """The samples as a PNG grid, upscaled 4x with nearest-neighbour."""
    from PIL import Image

    grid = image_grid(images, columns=columns)[..., 0]
    picture = Image.fromarray(grid)
    picture = picture.resize((picture.size[0] * 4, picture.size[1] * 4), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def plot_quality(quality: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = quality["reference_test_images"]
    panels = [
        ("confidence", "mean max-probability"),
        ("frac_confident", "fraction with confidence > 0.9"),
        ("class_entropy", "entropy of predicted classes (nats)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for sampler, marker in (("ancestral", "o"), ("ddim", "s")):
            rows = [r for r in quality["rows"] if r["sampler"] == sampler]
            if rows:
                ax.plot(
                    [r["steps"] for r in rows], [r[key] for r in rows], marker=marker, label=sampler
                )
        ax.axhline(ref[key], color="k", ls="--", lw=1, label="real test images")
        if key == "class_entropy":
            ax.axhline(IDEAL_ENTROPY, color="gray", ls=":", lw=1, label="ln 10 (uniform)")
        ax.set_xscale("log")
        ax.set_xlabel("sampler steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("VDM (learned schedule) on 8x8 digits: samples scored by the Mixer classifier")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(result: dict) -> str:
    s, q, meta = result["schedules"], result["quality"], result["meta"]
    lines = [
        "# VDM study: 8x8 digits",
        "",
        f"Device: {meta['device']}; command: `{meta['command']}`; runs in `{meta['runs']}`; "
        f"study time {meta['study_seconds']:.0f} s (2 shared CPU cores).",
        "",
        "## Learned vs fixed noise schedule (same preset, same number of steps)",
        "",
        "| schedule | step | test bpd (eval record) | +- 95% | recon | prior | diffusion "
        "| gamma_0 | gamma_1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("learned", "fixed"):
        r = s[name]
        lines.append(
            f"| {name} | {r['step']} | {r['bpd']:.4f} | {r['bpd_ci95']:.4f} | "
            f"{r['bpd_recon']:.4f} | {r['bpd_prior']:.5f} | {r['bpd_diff']:.4f} | "
            f"{r['gamma_0']:.2f} | {r['gamma_1']:.2f} |"
        )
    p = s["paired"]
    lines += [
        "",
        f"Paired on the same {p['num_images']} test images with the same key and "
        f"{p['num_draws']} stratified (t, eps) draws per image (EMA weights): "
        f"learned {s['learned']['study_bpd']:.4f} +- {s['learned']['study_bpd_ci95']:.4f}, "
        f"fixed {s['fixed']['study_bpd']:.4f} +- {s['fixed']['study_bpd_ci95']:.4f}; "
        f"**learned - fixed = {p['learned_minus_fixed']:+.4f} +- {p['ci95']:.4f} bpd** "
        f"(ratio {p['ratio']:.4f}).",
        "",
        f"## Sample quality vs sampler steps ({meta['num_samples']} samples each, learned model)",
        "",
        "Scored by the Mixer classifier: confidence = mean max-probability (+- 95%), entropy of "
        f"the predicted-class histogram (ideal ln 10 = {IDEAL_ENTROPY:.3f}), fraction with "
        "confidence > 0.9.",
        "",
        "| sampler | steps | confidence | +- | class entropy | frac > 0.9 | class counts | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = q["reference_test_images"]
    lines.append(
        f"| real test images (accuracy {ref['accuracy']:.3f}) | - | {ref['confidence']:.3f} | "
        f"{ref['confidence_ci95']:.3f} | {ref['class_entropy']:.3f} | "
        f"{ref['frac_confident']:.3f} | {ref['class_counts']} | - |"
    )
    for r in q["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['confidence']:.3f} | "
            f"{r['confidence_ci95']:.3f} | {r['class_entropy']:.3f} | "
            f"{r['frac_confident']:.3f} | {r['class_counts']} | {r['seconds']:.1f} |"
        )
    lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in meta["figures"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny training and sampling")
    parser.add_argument(
        "--reuse", type=pathlib.Path, help="existing runs: learned/fixed/classifier"
    )
    parser.add_argument("--workdir", type=pathlib.Path, help="where to train (default: a tmp dir)")
    parser.add_argument("--num", type=int, help="samples per configuration (default 256)")
    parser.add_argument("--steps", type=str, help="comma-separated sampler steps")
    parser.add_argument("--samplers", type=str, default="ancestral,ddim")
    parser.add_argument("--tag", type=str, help="output name suffix, e.g. 'steps1000'")
    parser.add_argument("--train-steps", type=int, help="VDM training steps (default: preset)")
    parser.add_argument("--step", type=int, help="VDM checkpoint step (default: newest)")
    parser.add_argument("--draws", type=int, help="(t, eps) draws per test image (default 16)")
    args = parser.parse_args()
    quick = args.quick
    num = args.num or (16 if quick else 256)
    draws = args.draws or (2 if quick else 16)
    default_steps = "2,5" if quick else "10,25,50,100,250,1000"
    step_counts = [int(s) for s in (args.steps or default_steps).split(",")]
    samplers = [s.strip() for s in args.samplers.split(",")]
    suffix = f".{args.tag}" if args.tag else (".quick" if quick else "")
    start = time.perf_counter()
    load_start = os.getloadavg()[0]

    training = None
    if args.reuse:
        root = args.reuse
    else:
        root = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="vdm_study_"))
        training = train_runs(root, quick, args.train_steps)

    schedules = compare_schedules(root, draws, args.step)
    p = schedules["paired"]
    print(f"learned - fixed: {p['learned_minus_fixed']:+.4f} +- {p['ci95']:.4f} bpd", flush=True)
    quality, grids = quality_vs_steps(root, step_counts, samplers, num, args.step)

    figures = []
    if len(step_counts) > 1:
        figures.append(f"docs/vdm_quality_vs_steps{suffix}.png")
        plot_quality(quality, ROOT / figures[0])
    for sampler, (images, _) in grids.items():
        name = f"docs/vdm_samples_{sampler}{suffix}.png"
        write_grid(images[:128], ROOT / name)
        figures.append(name)

    command = "python benchmarks/vdm_study.py" + (" --quick" if quick else "")
    if args.reuse:
        command += f" --reuse {args.reuse}"
    for flag in ("train_steps", "num", "steps", "step", "draws", "tag"):
        if getattr(args, flag) is not None:
            command += f" --{flag.replace('_', '-')} {getattr(args, flag)}"
    if args.samplers != "ancestral,ddim":
        command += f" --samplers {args.samplers}"
    result = {
        "meta": {
            "device": f"{jax.devices()[0].platform} ({platform.machine()}, "
            f"{jax.device_count()} device(s))",
            "command": command,
            "runs": str(root),
            "training_seconds": training,
            "study_seconds": time.perf_counter() - start,
            "load_average_start_end": [load_start, os.getloadavg()[0]],
            "num_samples": num,
            "figures": figures,
            "run_configs": {n: json.loads((root / n / "config.json").read_text()) for n in RUNS},
        },
        "schedules": schedules,
        "quality": {
            "reference_test_images": {
                k: v for k, v in quality["reference_test_images"].items() if k != "predicted"
            },
            "rows": [{k: v for k, v in r.items() if k != "predicted"} for r in quality["rows"]],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"vdm_study{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"vdm_study{suffix}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
