"""Amos vs a tuned AdamW: validation loss against training steps.

Two small problems, each trained once with Amos (flaxlab's default rules, the paper's
settings: momentum 0.9, elementwise clip 1.0, ``xi = 1 / sqrt(steps)``) and with AdamW at a
few peak learning rates, all with the same warmup + cosine schedule shape and the same data:

(a) ``vit-digits`` through :class:`flaxlab.train.Estimator` (``--set optimizer.name=amos``
    versus ``optimizer.learning_rate=...``), validation = the preset's evaluation split;
    the curve is read from ``<workdir>/metrics.jsonl`` (records with split ``"eval"``).
(b) a small causal transformer language model on the bytes of the Python standard library's
    sources (``flaxlab.nn.Encoder(causal=True)``, a plain optax loop), validation = held-out
    files (every 10th file, sorted by path).

For each problem the target is AdamW's best final validation loss over its learning rates; the
reported ratio is (first evaluated step at which Amos reaches the target) / (training steps).
The paper claims Amos gets there in <= 70% of the steps.

Run: ``python benchmarks/amos_convergence.py`` (writes benchmarks/results/amos_convergence.json
and .md and docs/amos_convergence.png); ``--quick`` for a short smoke run (.quick outputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlab.nn import Encoder
from flaxlab.optim import amos_with_defaults
from flaxlab.optim.factory import OptimizerConfig, make_schedule

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


@dataclasses.dataclass(frozen=True)
class Study:
    vit_steps: int = 600
    vit_eval_every: int = 50
    vit_adamw_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lm_steps: int = 400
    lm_eval_every: int = 25
    lm_adamw_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    lm_seq_len: int = 64
    lm_batch: int = 16
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_eval_batches: int = 8
    warmup_fraction: float = 0.05


QUICK = Study(
    vit_steps=100,
    vit_eval_every=25,
    vit_adamw_lrs=(3e-3,),
    lm_steps=60,
    lm_eval_every=20,
    lm_adamw_lrs=(3e-3,),
    lm_eval_batches=2,
)


# ------------------------------------------------------------------------------------------
# (a) vit-digits through the estimator


def vit_curve(study: Study, optimizer_overrides: list[str], workdir: Path):
    """(steps, eval losses, seconds) of one vit-digits run."""
    from flaxlab.configs import get_preset
    from flaxlab.train import Estimator
    from flaxlab.train.metrics import read_jsonl

    overrides = [
        f"train.steps={study.vit_steps}",
        f"train.eval_every={study.vit_eval_every}",
        f"train.log_every={study.vit_eval_every}",
        f"train.checkpoint_every={study.vit_steps}",
        f"optimizer.warmup_steps={max(1, int(study.warmup_fraction * study.vit_steps))}",
        *optimizer_overrides,
    ]
    config = get_preset("vit-digits", overrides)
    start = time.perf_counter()
    Estimator(config, workdir, progress=False).train()
    seconds = time.perf_counter() - start
    by_step = {}
    for record in read_jsonl(workdir / "metrics.jsonl"):
        if record["split"] == "eval" and "loss" in record:
            by_step[int(record["step"])] = float(record["loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps], seconds


# ------------------------------------------------------------------------------------------
# (b) byte-level causal LM on the standard library's sources


def stdlib_bytes(max_files: int = 400):
    """(train bytes, validation bytes) of the stdlib's .py files; every 10th file held out."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.is_file())[:max_files]
    if len(files) < 20:
        raise RuntimeError(f"found only {len(files)} .py files under {lib}")
    train, valid = [], []
    for i, path in enumerate(files):
        (valid if i % 10 == 0 else train).append(path.read_bytes())
    join = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8).astype(np.int32)
    return join(train), join(valid)


class ByteLM(nnx.Module):
    """Token embedding + learned positions, a causal pre-LN encoder, a linear head."""

    def __init__(self, seq_len, hidden, layers, heads, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, hidden, rngs=rngs)
        self.posemb = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, seq_len, hidden)))
        self.encoder = Encoder(hidden, layers, heads, 4 * hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 256, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.posemb[...][:, : tokens.shape[1]]
        return self.head(self.encoder(x, causal=True))


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def lm_schedule_config(name: str, lr: float | None, steps: int, warmup: int):
    """The optimizer config whose schedule :func:`flaxlab.optim.factory.make_schedule` builds."""
    return OptimizerConfig(name=name, learning_rate=lr or 1.0, warmup_steps=warmup, decay="cosine")


def lm_curve(study: Study, name: str, lr: float | None, data):
    """(steps, validation losses, seconds) of one LM run; ``name`` is 'amos' or 'adamw'."""
    train, valid = data
    warmup = max(1, int(study.warmup_fraction * study.lm_steps))
    schedule = make_schedule(lm_schedule_config(name, lr, study.lm_steps, warmup), study.lm_steps)
    if name == "amos":
        tx = amos_with_defaults(schedule)
    else:
        tx = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.01)
    tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
    model = ByteLM(
        study.lm_seq_len + 1, study.lm_hidden, study.lm_layers, study.lm_heads, rngs=nnx.Rngs(0)
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def eval_loss(model, batch):
        return lm_loss(model, batch)

    width = study.lm_seq_len + 1
    rng = np.random.default_rng(0)  # the same batches for every optimizer
    eval_rng = np.random.default_rng(1)
    eval_starts = eval_rng.integers(0, len(valid) - width, (study.lm_eval_batches, study.lm_batch))
    eval_batches = [jnp.asarray(valid[s[:, None] + np.arange(width)]) for s in eval_starts]

    def validate():
        return float(np.mean([float(eval_loss(model, b)) for b in eval_batches]))

    steps, losses = [], []
    start = time.perf_counter()
    for step in range(1, study.lm_steps + 1):
        starts = rng.integers(0, len(train) - width, study.lm_batch)
        train_step(model, optimizer, jnp.asarray(train[starts[:, None] + np.arange(width)]))
        if step % study.lm_eval_every == 0 or step == study.lm_steps:
            steps.append(step)
            losses.append(validate())
    return steps, losses, time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# summary, markdown, plot


def summarize(runs, total_steps):
    """Target = AdamW's best final loss; ratio of Amos steps to reach it over ``total_steps``."""
    adamw = {k: v for k, v in runs.items() if k != "amos"}
    best_name = min(adamw, key=lambda k: adamw[k]["losses"][-1])
    target = adamw[best_name]["losses"][-1]
    amos_run = runs["amos"]
    reached = next(
        (
            s
            for s, loss in zip(amos_run["steps"], amos_run["losses"], strict=True)
            if loss <= target
        ),
        None,
    )
    return {
        "best_adamw": best_name,
        "target_loss": target,
        "amos_final_loss": amos_run["losses"][-1],
        "amos_steps_to_target": reached,
        "total_steps": total_steps,
        "ratio": None if reached is None else reached / total_steps,
    }


def markdown(result) -> str:
    lines = ["# Amos vs tuned AdamW: convergence", "", f"Command: `{result['command']}`", ""]
    lines += [f"Device: {result['device']}", ""]
    lines += [
        "Target = AdamW's best final validation loss over its learning rates; ratio = first "
        "evaluated step at which Amos reaches it / training steps (the paper: <= 70%). Steps "
        "are only checked at evaluation points, so the ratio is rounded up to the next one.",
        "",
        "| problem | steps | best AdamW (final loss) | Amos final loss | Amos steps to "
        "target | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for problem, entry in result["problems"].items():
        s = entry["summary"]
        ratio = "not reached" if s["ratio"] is None else f"{s['ratio']:.0%}"
        reached = "-" if s["amos_steps_to_target"] is None else s["amos_steps_to_target"]
        lines.append(
            f"| {problem} | {s['total_steps']} | {s['best_adamw']} ({s['target_loss']:.4f}) | "
            f"{s['amos_final_loss']:.4f} | {reached} | {ratio} |"
        )
    lines += ["", "Final validation loss and time of every run:", ""]
    lines += ["| problem | run | final loss | best loss | seconds |", "|---|---|---|---|---|"]
    for problem, entry in result["problems"].items():
        for name, run in entry["runs"].items():
            lines.append(
                f"| {problem} | {name} | {run['losses'][-1]:.4f} | {min(run['losses']):.4f} | "
                f"{run['seconds']:.0f} |"
            )
    lines += ["", f"Curves: `{result['plot']}`.", ""]
    return "\n".join(lines)


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = result["problems"]
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.2), squeeze=False)
    for ax, (problem, entry) in zip(axes[0], problems.items(), strict=True):
        for name, run in entry["runs"].items():
            style = dict(color="black", linewidth=2.2) if name == "amos" else dict(alpha=0.8)
            ax.plot(run["steps"], run["losses"], "o-", markersize=3, label=name, **style)
        ax.axhline(entry["summary"]["target_loss"], color="gray", linestyle=":", linewidth=1)
        ax.set_title(problem)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss")
        ax.legend()
        lows = [min(r["losses"]) for r in entry["runs"].values()]
        highs = [r["losses"][min(2, len(r["losses"]) - 1)] for r in entry["runs"].values()]
        ax.set_ylim(min(lows) * 0.97, max(highs) * 1.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (.quick outputs)")
    parser.add_argument(
        "--only",
        choices=["vit-digits", "stdlib-lm"],
        default=None,
        help="run one problem and replace its entry in the existing results (others kept)",
    )
    args = parser.parse_args(argv)
    study = QUICK if args.quick else Study()
    load_at_start = os.getloadavg()[0]
    suffix = ".quick" if args.quick else ""
    stem = RESULTS / f"amos_convergence{suffix}"
    problems, commands = {}, []
    if args.only and Path(f"{stem}.json").exists():
        previous = json.loads(Path(f"{stem}.json").read_text())
        problems = {k: v for k, v in previous["problems"].items() if k != args.only}
        commands = [c for c in previous["command"].split("; ") if f"--only {args.only}" not in c]
    if args.only in (None, "vit-digits"):
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, overrides in [
                ("amos", ["optimizer.name=amos"]),
                *[
                    (f"adamw lr={lr:g}", ["optimizer.name=adamw", f"optimizer.learning_rate={lr}"])
                    for lr in study.vit_adamw_lrs
                ],
            ]:
                workdir = Path(tmp) / name.replace(" ", "_").replace("=", "")
                steps, losses, seconds = vit_curve(study, overrides, workdir)
                runs[name] = {"steps": steps, "losses": losses, "seconds": seconds}
                print(f"vit-digits {name}: final {losses[-1]:.4f} ({seconds:.0f} s)", flush=True)
        problems["vit-digits"] = {"runs": runs, "summary": summarize(runs, study.vit_steps)}
    if args.only in (None, "stdlib-lm"):
        data = stdlib_bytes()
        runs = {}
        for name, lr in [("amos", None), *[(f"adamw lr={lr:g}", lr) for lr in study.lm_adamw_lrs]]:
            steps, losses, seconds = lm_curve(study, name.split()[0], lr, data)
            runs[name] = {"steps": steps, "losses": losses, "seconds": seconds}
            print(f"stdlib-lm {name}: final {losses[-1]:.4f} ({seconds:.0f} s)", flush=True)
        problems["stdlib-lm"] = {
            "runs": runs,
            "summary": summarize(runs, study.lm_steps),
            "data": {"train_bytes": int(len(data[0])), "valid_bytes": int(len(data[1]))},
        }
    png = DOCS / f"amos_convergence{suffix}.png"
    command = " ".join(
        ["python benchmarks/amos_convergence.py", *(argv if argv is not None else sys.argv[1:])]
    )
    result = {
        "command": "; ".join([*commands, command]),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} usable CPUs, load average {load_at_start:.1f} at start",
        "study": dataclasses.asdict(study),
        "problems": {k: problems[k] for k in ("vit-digits", "stdlib-lm") if k in problems},
        "plot": str(png.relative_to(ROOT)),
    }
    plot(result, png)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
