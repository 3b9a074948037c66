"""FAVOR+ (Performer) benchmark: approximation error and long-sequence speed/memory.

(i) Error of FAVOR+ against exact softmax attention vs the number of random features
(64..1024), orthogonal vs iid Gaussian projections, averaged over draws, on inputs where exact
attention is far from uniform (queries/keys scaled so the logits have a chosen std). Reports the
relative output error ``||Y_favor - Y_exact|| / ||Y_exact||`` and the mean squared error of the
attention matrix; plot in docs/favor_error_vs_features.png.

(ii) Forward and forward+backward time and compiled peak memory (XLA ``memory_analysis``:
arguments + outputs + temporaries) vs sequence length (batch 1, 8 heads, dim 64, 256 features)
for exact attention (``jax.nn.dot_product_attention``, bidirectional and causal), bidirectional
FAVOR+, flaxlab's chunked causal FAVOR+, and the reference's per-token ``lax.scan`` causal
formulation (re-implemented here with its custom VJP). All run in one process, interleaved;
exact attention is skipped where its L^2 score matrix would not fit or take too long (recorded).
Plots in docs/favor_error_vs_features{.tag}.png and docs/favor_speed_vs_length{.tag}.png.

Run: ``python benchmarks/favor.py`` (writes benchmarks/results/favor.json and favor.md);
``--quick`` for a smoke run on toy sizes; ``--chunk-sweep`` also times chunk sizes at 4k.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab.nn import favor

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs"


# ----------------------------------------------------------------------------- (i) error study


def exact_attention_matrix(q, k):
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / jnp.sqrt(q.shape[-1])
    return jax.nn.softmax(logits, axis=-1)


def favor_attention_matrix(q, k, projection):
    qf = favor.softmax_kernel_features(q, projection, is_query=True)
    kf = favor.softmax_kernel_features(k, projection, is_query=False)
    scores = jnp.einsum("bihm,bjhm->bhij", qf, kf)
    return scores / jnp.sum(scores, axis=-1, keepdims=True)


@partial(jax.jit, static_argnames=("num_features", "feature_type"))
def errors_for_draws(keys, q, k, v, num_features, feature_type):
    """Relative output error and attention-matrix MSE for each projection key (vmapped)."""
    exact = exact_attention_matrix(q, k)
    y_exact = jnp.einsum("bhij,bjhd->bihd", exact, v)

    def one(key):
        projection = favor.draw_projection(key, num_features, q.shape[-1], feature_type)
        approx = favor_attention_matrix(q, k, projection)
        y_favor = favor.favor_attention(q, k, v, projection)
        return (
            jnp.linalg.norm(y_favor - y_exact) / jnp.linalg.norm(y_exact),
            jnp.mean(jnp.square(approx - exact)),
        )

    return jax.vmap(one)(keys)


def error_study(feature_counts, logit_stds, length, dim, draws, seed=0):
    rows = []
    key = jax.random.key(seed)
    for logit_std in logit_stds:
        kq, kk, kv, kdraw = jax.random.split(jax.random.fold_in(key, int(logit_std * 100)), 4)
        # q.k / sqrt(d) has std s^2 when q, k ~ N(0, s^2 I): s = sqrt(logit_std)
        scale = logit_std**0.5
        q = scale * jax.random.normal(kq, (1, length, 1, dim))
        k = scale * jax.random.normal(kk, (1, length, 1, dim))
        v = jax.random.normal(kv, (1, length, 1, dim))
        exact = exact_attention_matrix(q, k)
        y_exact = jnp.einsum("bhij,bjhd->bihd", exact, v)
        uniform_gap = float(
            jnp.linalg.norm(y_exact - v.mean(axis=1, keepdims=True)) / jnp.linalg.norm(y_exact)
        )
        max_weight = float(exact.max() * length)
        for num_features in feature_counts:
            for feature_type in ("orthogonal", "iid"):
                keys = jax.random.split(kdraw, draws)
                errs, mses = (
                    np.asarray(x)
                    for x in errors_for_draws(keys, q, k, v, num_features, feature_type)
                )
                rows.append(
                    dict(
                        logit_std=logit_std,
                        num_features=num_features,
                        feature_type=feature_type,
                        rel_output_error=float(np.mean(errs)),
                        rel_output_error_sem=float(np.std(errs) / np.sqrt(draws)),
                        attention_mse=float(np.mean(mses)),
                        uniform_rel_error=uniform_gap,
                        max_weight_times_length=max_weight,
                    )
                )
                print(
                    f"[error] logit_std={logit_std} M={num_features:5d} {feature_type:10s} "
                    f"rel_err={np.mean(errs):.4f} mse={np.mean(mses):.3e} "
                    f"(uniform attention: {uniform_gap:.3f})",
                    flush=True,
                )
    return rows


# ----------------------------------------------------------------------------- (ii) speed


reference_scan_causal = favor.reference_causal_favor


def attention_variants(projection, chunk_size=None):
    return {
        "exact": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
        "exact_causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        "favor_bidirectional": lambda q, k, v: favor.favor_attention(q, k, v, projection),
        "favor_causal": lambda q, k, v: favor.favor_attention(
            q, k, v, projection, causal=True, chunk_size=chunk_size
        ),
        "favor_causal_batched": lambda q, k, v: favor.favor_attention(
            q, k, v, projection, causal=True, chunk_size=chunk_size, implementation="batched"
        ),
        "reference_scan_causal": lambda q, k, v: reference_scan_causal(q, k, v, projection),
    }


def compile_modes(fn, args, probe):
    forward = jax.jit(fn)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * probe)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out = {}
    for mode, f in (("forward", forward), ("forward_backward", backward)):
        start = time.perf_counter()
        compiled = f.lower(*args).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        peak = None
        if mem is not None:
            peak = int(
                mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            )
        out[mode] = (compiled, compile_s, peak)
    return out


def time_call(compiled, args, repeats):
    """Minimum wall time over ``repeats`` runs after a warm-up (the minimum is the estimate
    least disturbed by other processes sharing the machine)."""
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def speed_study(lengths, heads, dim, num_features, exact_max_length, scan_max_length, chunk_size):
    projection = favor.gaussian_orthogonal_random_matrix(jax.random.key(0), num_features, dim)
    rows = []
    for length in lengths:
        kq, kk, kv, kp = jax.random.split(jax.random.fold_in(jax.random.key(1), length), 4)
        args = tuple(0.5 * jax.random.normal(kk_, (1, length, heads, dim)) for kk_ in (kq, kk, kv))
        probe = jax.random.normal(kp, (1, length, heads, dim))
        repeats = 2 if length <= 4096 else 1
        for name, fn in attention_variants(projection, chunk_size).items():
            row = dict(method=name, length=length)
            if name.startswith("exact") and length > exact_max_length:
                row["skipped"] = (
                    f"L^2 scores ({4 * heads * length**2 / 2**30:.1f} GiB per pass) and "
                    "minutes per call on this CPU"
                )
                rows.append(row)
                print(f"[speed] L={length:6d} {name:22s} skipped: {row['skipped']}", flush=True)
                continue
            if name == "reference_scan_causal" and length > scan_max_length:
                row["skipped"] = "per-token scan too slow for this run's time budget"
                rows.append(row)
                print(f"[speed] L={length:6d} {name:22s} skipped", flush=True)
                continue
            for mode, (compiled, compile_s, peak) in compile_modes(fn, args, probe).items():
                row[f"{mode}_s"] = time_call(compiled, args, repeats)
                row[f"{mode}_compile_s"] = compile_s
                row[f"{mode}_peak_bytes"] = peak
            rows.append(row)
            print(
                f"[speed] L={length:6d} {name:22s} fwd {row['forward_s'] * 1e3:9.1f} ms  "
                f"fwd+bwd {row['forward_backward_s'] * 1e3:9.1f} ms  "
                f"peak fwd+bwd {row['forward_backward_peak_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )
    return rows


def chunk_sweep(length, heads, dim, num_features, chunk_sizes):
    projection = favor.gaussian_orthogonal_random_matrix(jax.random.key(0), num_features, dim)
    ks = jax.random.split(jax.random.key(2), 4)
    args = tuple(0.5 * jax.random.normal(kk, (1, length, heads, dim)) for kk in ks[:3])
    probe = jax.random.normal(ks[3], (1, length, heads, dim))
    rows = []
    exact = compile_modes(attention_variants(projection)["exact_causal"], args, probe)
    exact_s = time_call(exact["forward_backward"][0], args, 3)
    for chunk in chunk_sizes:
        fn = attention_variants(projection, chunk)["favor_causal"]
        compiled = compile_modes(fn, args, probe)["forward_backward"][0]
        t = time_call(compiled, args, 3)
        rows.append(dict(chunk_size=chunk, forward_backward_s=t, ratio_to_exact_causal=t / exact_s))
        print(f"[chunk] L={length} C={chunk:4d} fwd+bwd {t * 1e3:.1f} ms ({t / exact_s:.3f}x)")
    return rows


# ----------------------------------------------------------------------------- reporting


def ratio_table(speed_rows):
    by = {(r["method"], r["length"]): r for r in speed_rows}
    lines = []
    for length in sorted({r["length"] for r in speed_rows}):
        base = by.get(("exact_causal", length), {})
        if "forward_backward_s" not in base:
            continue
        for name in (
            "favor_causal",
            "favor_causal_batched",
            "reference_scan_causal",
            "favor_bidirectional",
        ):
            r = by.get((name, length), {})
            if "forward_backward_s" in r:
                ratio = r["forward_backward_s"] / base["forward_backward_s"]
                lines.append((length, name, ratio))
    return lines


def write_markdown(path, meta, error_rows, speed_rows, sweep_rows):
    out = ["# FAVOR+ benchmark", "", f"Command: `{meta['command']}`  ", f"Device: {meta['device']}"]
    out += ["", "## (i) Error vs number of features (bidirectional, mean over draws)", ""]
    out += ["| logit std | M | features | rel. output error | attention MSE | uniform rel. error |"]
    out += ["|---|---|---|---|---|---|"]
    for r in error_rows:
        out.append(
            f"| {r['logit_std']} | {r['num_features']} | {r['feature_type']} | "
            f"{r['rel_output_error']:.4f} ± {r['rel_output_error_sem']:.4f} | "
            f"{r['attention_mse']:.3e} | {r['uniform_rel_error']:.3f} |"
        )
    out += ["", "## (ii) Time and compiled peak memory vs length", ""]
    out += ["| L | method | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |"]
    out += ["|---|---|---|---|---|---|"]
    for r in speed_rows:
        if "skipped" in r:
            out.append(f"| {r['length']} | {r['method']} | skipped: {r['skipped']} | | | |")
            continue
        out.append(
            f"| {r['length']} | {r['method']} | {r['forward_s'] * 1e3:.1f} | "
            f"{r['forward_backward_s'] * 1e3:.1f} | {r['forward_peak_bytes'] / 2**20:.1f} | "
            f"{r['forward_backward_peak_bytes'] / 2**20:.1f} |"
        )
    out += ["", "Forward+backward time relative to exact causal attention (same process):", ""]
    out += ["| L | method | ratio |", "|---|---|---|"]
    out += [
        f"| {length} | {name} | {ratio:.3f} |" for length, name, ratio in ratio_table(speed_rows)
    ]
    if sweep_rows:
        out += ["", "## Chunk-size sweep (flaxlab causal, fwd+bwd)", ""]
        out += ["| chunk | fwd+bwd ms | ratio to exact causal |", "|---|---|---|"]
        out += [
            f"| {r['chunk_size']} | {r['forward_backward_s'] * 1e3:.1f} | "
            f"{r['ratio_to_exact_causal']:.3f} |"
            for r in sweep_rows
        ]
    path.write_text("\n".join(out) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(exist_ok=True)
    return plt


def plot_error(error_rows, suffix):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for logit_std in sorted({r["logit_std"] for r in error_rows}):
        for feature_type, style in (("orthogonal", "-o"), ("iid", "--s")):
            rows = [
                r
                for r in error_rows
                if r["logit_std"] == logit_std and r["feature_type"] == feature_type
            ]
            ax.errorbar(
                [r["num_features"] for r in rows],
                [r["rel_output_error"] for r in rows],
                yerr=[r["rel_output_error_sem"] for r in rows],
                fmt=style,
                label=f"{feature_type}, logit std {logit_std}",
            )
    ax.set(xscale="log", yscale="log", xlabel="random features M", ylabel="relative output error")
    ax.set_title("FAVOR+ vs exact softmax attention")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / f"favor_error_vs_features{suffix}.png", dpi=120)
    plt.close(fig)


def plot_speed(speed_rows, suffix):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["method"] for r in speed_rows}):
        rows = [r for r in speed_rows if r["method"] == name and "skipped" not in r]
        lengths = [r["length"] for r in rows]
        axes[0].plot(lengths, [r["forward_backward_s"] * 1e3 for r in rows], "-o", label=name)
        axes[1].plot(
            lengths, [r["forward_backward_peak_bytes"] / 2**20 for r in rows], "-o", label=name
        )
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="fwd+bwd ms")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="fwd+bwd peak MiB")
    axes[0].legend(fontsize=7)
    fig.suptitle("batch 1, 8 heads, dim 64, 256 features")
    fig.tight_layout()
    fig.savefig(DOCS / f"favor_speed_vs_length{suffix}.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--chunk-sweep", action="store_true", help="time chunk sizes at 4k")
    parser.add_argument("--chunk-size", type=int, default=None, help="override the default")
    parser.add_argument("--skip-error", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--lengths", type=str, help="comma-separated sequence lengths to time")
    parser.add_argument("--tag", type=str, help="results name suffix, e.g. 'speed4k'")
    args = parser.parse_args(argv)
    if args.quick:
        features, stds, err_len, draws = [64, 256], [1.0], 64, 2
        lengths, exact_max, scan_max = [256, 512], 512, 512
        sweep = [64, 128] if args.chunk_sweep else []
        suffix = ".quick"
    else:
        features, stds, err_len, draws = [64, 128, 256, 512, 1024], [0.25, 1.0], 256, 8
        lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
        exact_max, scan_max = 4096, 65536
        sweep = [16, 32, 64, 128, 256] if args.chunk_sweep else []
        suffix = ""
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    if args.tag:
        suffix += f".{args.tag}"
    meta = dict(
        command=" ".join(["python benchmarks/favor.py", *(sys.argv[1:] if argv is None else argv)]),
        device=f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}",
        jax=jax.__version__,
        default_chunk_size=favor.DEFAULT_CHUNK_SIZE,
        default_causal_implementation=favor.default_implementation(),
    )
    error_rows = [] if args.skip_error else error_study(features, stds, err_len, 64, draws)
    speed_rows = []
    if not args.skip_speed:
        speed_rows = speed_study(lengths, 8, 64, 256, exact_max, scan_max, args.chunk_size)
    sweep_len = 512 if args.quick else 4096
    sweep_rows = chunk_sweep(sweep_len, 8, 64, 256, sweep) if sweep else []
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = dict(meta=meta, error=error_rows, speed=speed_rows, chunk_sweep=sweep_rows)
    result["ratios_fwd_bwd_vs_exact_causal"] = [
        dict(length=length, method=name, ratio=ratio)
        for length, name, ratio in ratio_table(speed_rows)
    ]
    (RESULTS / f"favor{suffix}.json").write_text(json.dumps(result, indent=2))
    write_markdown(RESULTS / f"favor{suffix}.md", meta, error_rows, speed_rows, sweep_rows)
    if error_rows:
        plot_error(error_rows, suffix)
    if speed_rows:
        plot_speed(speed_rows, suffix)
    for length, name, ratio in ratio_table(speed_rows):
        print(f"[ratio] L={length} {name}: {ratio:.3f}x exact causal (fwd+bwd)")


if __name__ == "__main__":
    main()
