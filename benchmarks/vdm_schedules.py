"""VDM on digits: fixed vs learned noise schedules over several training seeds.

Trains (or, with ``--reuse``, reads) ``vdm-digits`` runs for each schedule arm and seed, as the
CLI does (``flaxlab train vdm-digits --workdir DIR/ARM_sSEED --set train.seed=SEED ...``):

* ``fixed``: ``model.schedule=fixed`` (the linear -13.3 .. 5 line);
* ``learned_scalar``: ``model.schedule=learned_scalar`` (the reference's CIFAR-10 choice: only
  the endpoints are learned);
* ``learned_net``: ``model.schedule=learned_net`` with ``schedule_hidden_init=1`` and
  ``schedule_learning_rate=100`` (the shape learned on the variance of the loss estimate; the
  ``vdm-digits`` preset);
* the same three with ``_T10``: discrete time with ``model.timesteps=10``, where the shape enters
  the VLB itself (each compared with ``fixed_T10``).

For every run it reports the final ``eval`` record and a re-evaluation of the EMA model on the
whole test set with ``--draws`` single ``(t, eps)`` draws per image (the same keys for every
run): the test bits/dim, and the per-image standard deviation of a single-draw estimate (the
Monte-Carlo noise that the schedule's shape controls). Then, per arm, the mean and spread over
seeds, and each learned arm minus ``fixed``.

With ``--integrand RUN`` it also measures, on one trained model, the mean squared noise-
prediction error against gamma, and from it the single-draw standard deviation of the
diffusion loss under the linear schedule and under the variance-minimising shape
(``gamma'(t)`` proportional to ``1/sqrt(E[mse^2 | gamma])``); the plot
docs/vdm_schedule_shape.png shows the learned shapes against the linear and the ideal one.

    python benchmarks/vdm_schedules.py --workdir /tmp/v6 --seeds 0,1,2 --reuse \\
        --integrand /tmp/v6/fixed_s1

Writes benchmarks/results/vdm_schedules{.tag}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab.data.factory import make_data
from flaxlab.models.vdm import FixedLinearSchedule, to_pixels
from flaxlab.train import Estimator, load_config
from flaxlab.train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
ARMS = {
    "fixed": ["model.schedule=fixed"],
    "learned_scalar": ["model.schedule=learned_scalar"],
    "learned_net": [
        "model.schedule=learned_net",
        "model.schedule_hidden_init=1.0",
        "model.schedule_learning_rate=100.0",
    ],
}
# Discrete time with T = 10 steps: there the shape enters the VLB itself (and is learned on it).
ARMS.update({f"{name}_T10": overrides + ["model.timesteps=10"] for name, overrides in ARMS.items()})


def baseline_of(arm: str) -> str:
    """The fixed-schedule arm an arm is compared with (same time discretisation)."""
    return "fixed" + arm[arm.rindex("_T") :] if "_T" in arm else "fixed"


def train(workdir: pathlib.Path, arm: str, seed: int) -> None:
    cli = pathlib.Path(sys.executable).parent / "flaxlab"  # the console script of this env
    command = [str(cli), "train", "vdm-digits", "--workdir", str(workdir)]
    for override in ARMS[arm] + [f"train.seed={seed}"]:
        command += ["--set", override]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ))


def test_images(config):
    _, eval_iterator = make_data(config.data)
    chunks = []
    for batch in eval_iterator():
        keep = np.asarray(batch.get("mask", np.ones(len(batch["image"]), bool)), bool)
        chunks.append(np.asarray(to_pixels(jnp.asarray(batch["image"])))[keep])
    return jnp.asarray(np.concatenate(chunks))


def evaluate(run: pathlib.Path, draws: int) -> dict:
    """Final eval record, and bits/dim from ``draws`` single draws per test image."""
    config = load_config(run)
    model = Estimator(config, run, progress=False).restore_model()
    images = test_images(config)
    scale = 1.0 / (config.model.num_dims * math.log(2.0))

    @jax.jit
    def one_draw(key):
        recon, prior, diff = model.per_example_losses(images, None, key, deterministic=True)
        return scale * (recon + prior + diff)

    values = np.stack([np.asarray(one_draw(jax.random.key(1000 + i))) for i in range(draws)])
    per_image = values.mean(axis=0)
    final = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "eval"][-1]
    g0, g1 = (float(x) for x in model.schedule.endpoints())
    t = jnp.linspace(0.0, 1.0, 21)
    return dict(
        run=str(run),
        steps=int(final["step"]),
        eval_record_bpd=float(final["bpd"]),
        eval_record_ci95=float(final.get("bpd_ci95", float("nan"))),
        bpd=float(per_image.mean()),
        bpd_ci95=float(1.96 * per_image.std(ddof=1) / math.sqrt(len(per_image))),
        single_draw_std=float(np.sqrt(np.mean(values.var(axis=0, ddof=1)))),
        gamma_0=g0,
        gamma_1=g1,
        shape=[float(x) for x in model.schedule.shape(t)],
        per_image=per_image.tolist(),
    )


def integrand(run: pathlib.Path, grid: int = 128, repeats: int = 2) -> dict:
    """E[mse | gamma] and E[mse^2 | gamma] of one trained model over a grid of gamma."""
    config = load_config(run)
    model = Estimator(config, run, progress=False).restore_model()
    g0, g1 = (float(x) for x in model.schedule.endpoints())
    model.schedule = FixedLinearSchedule(g0, g1)
    images = test_images(config)
    n = images.shape[0]

    @jax.jit
    def mse_at(t, key):
        times = jnp.full((n,), t)
        diff = model.per_example_losses(images, None, key, deterministic=True, times=times)[2]
        return diff / (0.5 * (g1 - g0))

    ts = (np.arange(grid) + 0.5) / grid
    m1, m2 = [], []
    for i, t in enumerate(ts):
        mse = np.concatenate(
            [np.asarray(mse_at(t, jax.random.key(97 * i + r)), np.float64) for r in range(repeats)]
        )
        m1.append(mse.mean())
        m2.append(np.mean(mse**2))
    m1, m2 = np.array(m1), np.array(m2)
    gamma = g0 + (g1 - g0) * ts
    step = (g1 - g0) / grid
    to_bpd = 1.0 / (config.model.num_dims * math.log(2.0))
    mean = 0.5 * np.sum(m1) * step  # E[L] in nats, the same for every shape
    linear_sq = 0.25 * (g1 - g0) * np.sum(m2) * step  # E[L^2], L = 0.5 (g1 - g0) mse
    ideal_sq = 0.25 * (np.sum(np.sqrt(m2)) * step) ** 2  # gamma' ~ 1 / sqrt(E[mse^2])
    cumulative = np.concatenate([[0.0], np.cumsum(np.sqrt(m2))])
    ideal_shape = (cumulative / cumulative[-1]).tolist()  # nu at gamma edges
    return dict(
        run=str(run),
        gamma=gamma.tolist(),
        mse_mean=m1.tolist(),
        mse_sq=m2.tolist(),
        diffusion_bpd=mean * to_bpd,
        single_draw_std_linear=math.sqrt(max(linear_sq - mean**2, 0.0)) * to_bpd,
        single_draw_std_ideal=math.sqrt(max(ideal_sq - mean**2, 0.0)) * to_bpd,
        ideal_gamma_edges=np.linspace(g0, g1, grid + 1).tolist(),
        ideal_shape=ideal_shape,
    )


def summarise(rows: list[dict]) -> dict:
    arms = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    out = {}
    for arm, group in arms.items():
        bpd = np.array([r["bpd"] for r in group])
        out[arm] = dict(
            seeds=[r["seed"] for r in group],
            bpd_mean=float(bpd.mean()),
            bpd_seed_std=float(bpd.std(ddof=1)) if len(bpd) > 1 else float("nan"),
            single_draw_std=float(np.mean([r["single_draw_std"] for r in group])),
        )
    for arm in out:
        base_arm = baseline_of(arm)
        if arm == base_arm or base_arm not in out:
            continue
        base = np.array([r["bpd"] for r in arms[base_arm]])
        other = np.array([r["bpd"] for r in arms[arm]])
        se = math.sqrt(
            (base.var(ddof=1) / len(base) if len(base) > 1 else 0.0)
            + (other.var(ddof=1) / len(other) if len(other) > 1 else 0.0)
        )
        # Same test images and draws in every run: the per-image difference averaged over
        # the seeds of each arm, with its interval over images.
        paired = np.mean([r["per_image"] for r in arms[arm]], axis=0) - np.mean(
            [r["per_image"] for r in arms[base_arm]], axis=0
        )
        out[arm]["baseline"] = base_arm
        out[arm]["minus_fixed"] = float(other.mean() - base.mean())
        out[arm]["minus_fixed_seed_se"] = se
        out[arm]["minus_fixed_paired_ci95"] = float(
            1.96 * paired.std(ddof=1) / math.sqrt(len(paired))
        )
    return out


def plot(rows, curve, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    t = np.linspace(0.0, 1.0, 21)
    ax.plot(t, t, "--", color="gray", label="linear (fixed, learned scalar)")
    if curve is not None:
        g = np.array(curve["ideal_gamma_edges"])
        ax.plot(
            curve["ideal_shape"],
            (g - g[0]) / (g[-1] - g[0]),
            "k-",
            lw=2.5,
            label="variance-minimising (measured)",
        )
    for row in rows:
        if row["arm"].startswith("learned_net"):
            kind = row["arm"][len("learned_net") :].lstrip("_") or "continuous"
            label = f"learned net ({kind})"
            ax.plot(t, row["shape"], "-", label=f"{label}, seed {row['seed']}")
    ax.set(xlabel="t", ylabel="normalised schedule nu(t)", title="VDM noise schedule shape")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(path, meta, rows, summary, curve):
    out = ["# VDM schedules on digits", "", f"Command: `{meta['command']}`  "]
    out += [f"Machine: {meta['machine']}", ""]
    out += [
        "| arm | seed | steps | eval record bpd | bpd (re-eval) | single-draw std | gamma_0 "
        "| gamma_1 | nu(0.5) |"
    ]
    out += ["|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['eval_record_bpd']:.3f} +- "
            f"{r['eval_record_ci95']:.3f} | {r['bpd']:.3f} +- {r['bpd_ci95']:.3f} | "
            f"{r['single_draw_std']:.2f} | {r['gamma_0']:.2f} | {r['gamma_1']:.2f} | "
            f"{r['shape'][10]:.3f} |"
        )
    out += ["", "| arm | seeds | mean bpd | std over seeds | minus its fixed arm | paired 95% |"]
    out += ["|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        diff = s.get("minus_fixed")
        diff_text = (
            "" if diff is None else f"{diff:+.3f} (seed s.e. {s['minus_fixed_seed_se']:.3f})"
        )
        paired = s.get("minus_fixed_paired_ci95")
        out.append(
            f"| {arm} | {s['seeds']} | {s['bpd_mean']:.3f} | {s['bpd_seed_std']:.3f} | "
            f"{diff_text} | {'' if paired is None else f'+- {paired:.3f}'} |"
        )
    if curve is not None:
        out += [
            "",
            f"Integrand of {curve['run']}: diffusion term {curve['diffusion_bpd']:.3f} bpd; "
            f"single-draw std {curve['single_draw_std_linear']:.2f} bpd with the linear shape, "
            f"{curve['single_draw_std_ideal']:.2f} with the variance-minimising shape.",
        ]
    path.write_text("\n".join(out) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--seeds", type=str, default="0,1")
    parser.add_argument("--arms", type=str, default="fixed,learned_net")
    parser.add_argument("--reuse", action="store_true", help="do not train runs that exist")
    parser.add_argument("--no-train", action="store_true", help="only evaluate existing runs")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--integrand", type=pathlib.Path, help="a trained run to analyse")
    parser.add_argument("--tag", type=str)
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            parser.error(f"unknown arm {arm!r}; accepted: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for arm in arms:
        for seed in seeds:
            run = args.workdir / f"{arm}_s{seed}"
            exists = (run / "metrics.jsonl").exists()
            if args.no_train and not exists:
                print(f"[skip] {run}: no run there (--no-train)", flush=True)
                continue
            if not (exists and (args.reuse or args.no_train)):
                train(run, arm, seed)
            row = dict(arm=arm, seed=seed, **evaluate(run, args.draws))
            print(
                f"[run] {arm} seed {seed}: bpd {row['bpd']:.3f} +- {row['bpd_ci95']:.3f} "
                f"(record {row['eval_record_bpd']:.3f}), single-draw std "
                f"{row['single_draw_std']:.2f}, nu(0.5) {row['shape'][10]:.3f}",
                flush=True,
            )
            rows.append(row)
    summary = summarise(rows)
    for arm, s in summary.items():
        print(f"[arm] {arm}: {json.dumps({k: v for k, v in s.items()})}", flush=True)
    curve = integrand(args.integrand) if args.integrand else None
    suffix = f".{args.tag}" if args.tag else ""
    meta = dict(
        command=" ".join(["python benchmarks/vdm_schedules.py", *(argv or sys.argv[1:])]),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = dict(meta=meta, runs=rows, summary=summary, integrand=curve)
    (RESULTS / f"vdm_schedules{suffix}.json").write_text(json.dumps(result, indent=1))
    write_markdown(RESULTS / f"vdm_schedules{suffix}.md", meta, rows, summary, curve)
    plot(rows, curve, DOCS / f"vdm_schedule_shape{suffix}.png")
    print(f"wrote {RESULTS / f'vdm_schedules{suffix}.md'}")


if __name__ == "__main__":
    main()
