"""Where a trained VDM's VLB wants gamma_0: test bits/dim with the schedule's low end moved.

In continuous time the VDM loss depends on the noise schedule only through its endpoints, so a
learned schedule can beat a fixed one (on the VLB) only by moving ``gamma_0`` / ``gamma_1``.
This evaluates a trained run (its EMA weights) on the whole test set with
``FixedLinearSchedule(g0, gamma_1)`` for several ``g0`` (same key, 16 stratified ``(t, eps)``
draws per image), splitting reconstruction and diffusion terms. The score network is
conditioned on gamma normalised by the training range, so values of ``g0`` below that range
are extrapolations.

    python benchmarks/vdm_endpoint_sweep.py RUN_DIR [--gamma0 -14.5,-13.3,-12.5,-11.5,-10]

Writes benchmarks/results/vdm_endpoint_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab.data.factory import make_data
from flaxlab.models.vdm import FixedLinearSchedule, evaluate_bpd, to_pixels
from flaxlab.train.estimator import Estimator, load_config

RESULTS = Path(__file__).parent / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a vdm-digits work directory")
    parser.add_argument("--gamma0", type=str, default="-14.5,-13.3,-12.5,-11.5,-10")
    parser.add_argument("--draws", type=int, default=16)
    args = parser.parse_args()
    config = load_config(args.run)
    model = Estimator(config, args.run, progress=False).restore_model()
    _, gamma_1 = (float(x) for x in model.schedule.endpoints())
    _, eval_iterator = make_data(config.data)
    batches = [b for b in eval_iterator()]
    rows = []
    for g0 in (float(x) for x in args.gamma0.split(",")):
        model.schedule = FixedLinearSchedule(g0, gamma_1)

        @jax.jit
        def per_image(images):
            return evaluate_bpd(model, images, None, jax.random.key(0), num_draws=args.draws)

        sums, count = {}, 0
        for batch in batches:
            mask = np.asarray(batch.get("mask", np.ones(len(batch["image"]), bool)), bool)
            out = per_image(to_pixels(jnp.asarray(batch["image"])))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)[mask]))
            count += int(mask.sum())
        row = {"gamma_0": g0, "gamma_1": gamma_1} | {k: v / count for k, v in sums.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vdm_endpoint_sweep.json").write_text(
        json.dumps({"run": str(args.run), "draws": args.draws, "rows": rows}, indent=1)
    )
    lines = [
        "# VDM: test bits/dim of a trained model with gamma_0 moved",
        "",
        f"Run `{args.run}` (schedule {config.model.schedule!r}, EMA weights), "
        f"{args.draws} draws per test image; command: "
        f"`python benchmarks/vdm_endpoint_sweep.py {args.run} --gamma0 {args.gamma0}`.",
        "",
        "| gamma_0 | bpd | recon | diffusion | prior |",
        "|---|---|---|---|---|",
    ] + [
        f"| {r['gamma_0']:.2f} | {r['bpd']:.4f} | {r['bpd_recon']:.4f} | {r['bpd_diff']:.4f} | "
        f"{r['bpd_prior']:.4f} |"
        for r in rows
    ]
    (RESULTS / "vdm_endpoint_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
