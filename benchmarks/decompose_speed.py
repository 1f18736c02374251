"""Speed, memory and accuracy of lowrank's decompositions, against the reference tools' methods.

Run from the repository root (the full run takes about 5 minutes on 2 idle CPU cores):

    .venv/bin/python benchmarks/decompose_speed.py
    .venv/bin/python benchmarks/decompose_speed.py --quick    # smoke test, well under a minute
    .venv/bin/python benchmarks/decompose_speed.py --replot benchmarks/results/decompose_speed.json  # PNG only

Measures, on kernels drawn from PyTorch's default Conv2d initialisation under ``torch.manual_seed(0)``:

1. ``spatial`` (AMCT's method) at the rank the default policy picks: the time of
   ``lowrank.functional.spatial_factors``, its peak memory (resident set size of a fresh process, see
   ``peak_memory``), its relative error, and the optimal error of that structure, from the singular
   values of the same unfolding in float64; the full LAPACK SVD that AMCT runs is timed where it is
   affordable (``--full-svd-max-dim``).
2. ``tucker2`` (msModelSlim's method) at half ranks against ``tensorly.decomposition.partial_tucker``
   (defaults: init="svd", n_iter_max=100, tol=1e-4) on the same float32 kernel.
3. Full-rank exactness of every method: the replacement's output against the dense layer's.
4. The default ``lowrank.auto_decomposition`` of a torchvision ResNet.

Prints a table with a PASS/FAIL verdict next to each target, saves everything, with the machine's
description, as JSON, and plots the times and errors per kernel into a PNG next to it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import tensorly
import torch
import torchvision
from common import (
    add_output_argument,
    add_replot_argument,
    command_line,
    machine_info,
    output_path,
    pyplot,
    save_figure,
    save_json,
    table,
    verdict,
)
from tensorly.decomposition import partial_tucker
from tensorly.tenalg import multi_mode_dot
from torch import nn

import lowrank
from lowrank import functional as F
from lowrank.methods import METHODS, build_module
from lowrank.policy import RankPolicy

SHAPES = ((512, 512, 3, 3), (1024, 1024, 3, 3), (512, 512, 5, 5), (2048, 2048, 5, 5))
# --quick shrinks the first shape's channels by this factor and decomposes resnet18 instead, on 1 thread:
# a smoke test that stays fast on a busy machine, not figures to compare with the targets.
QUICK_CHANNEL_DIVISOR = 8
# A timing is the best of up to --repeats runs; no new run starts once this many seconds are spent.
TIME_BUDGET_S = 10.0

# Targets.
SPATIAL_MAX_ERROR_RATIO = 1.01
TUCKER2_ERROR_SLACK = 1e-6  # relative: rounding, both iterate in float32
TUCKER2_SPEEDUP_SHAPE, TUCKER2_MIN_SPEEDUP = (512, 512, 3, 3), 10.0
LARGE_SHAPE, LARGE_MAX_SECONDS, LARGE_MAX_GIB = (2048, 2048, 5, 5), 30.0, 4.0
RESNET_MAX_SECONDS = 5.0
FULL_RANK_MAX_ERROR = 1e-5

# Runs spatial_factors once in a fresh interpreter and prints its resident set size just before the call and
# its peak during the call, in KiB. Both come from /proc/self/status, which describes this process's own address
# space: ru_maxrss would not do, Linux carries the parent's high-water mark over fork and exec into it. Writing 5 to
# clear_refs resets the high-water mark (VmHWM) to the current RSS, so the peak is the call's alone.
MEMORY_CHILD = """
import json, sys
from pathlib import Path
import torch
from torch import nn
from lowrank.functional import spatial_factors

def status_kib(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])

cout, cin, kh, kw, rank, vertical_first, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
weight = nn.Conv2d(cin, cout, (kh, kw)).weight.detach()
Path("/proc/self/clear_refs").write_text("5")
before = status_kib("VmRSS")
spatial_factors(weight, rank, vertical_first)
print(json.dumps({"before_kib": before, "peak_kib": status_kib("VmHWM")}))
"""


def parse_shape(text):
    shape = tuple(int(x) for x in text.split(","))
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected Cout,Cin,kh,kw, got {text!r}")
    return shape


def show_shape(shape):
    return "x".join(map(str, shape))


def make_conv(shape):
    """The Conv2d whose (Cout, Cin, kh, kw) weight is ``shape``, default-initialised under seed 0."""
    cout, cin, kh, kw = shape
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, (kh, kw))


def timed(fn, repeats):
    """``fn()``'s result and its best wall time over up to ``repeats`` runs (fewer past TIME_BUDGET_S)."""
    times = []
    while len(times) < repeats and sum(times) < TIME_BUDGET_S:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def relative_error(approx, weight):
    weight = weight.double()
    return ((approx.double() - weight).norm() / weight.norm()).item()


def warm_up():
    """Loads and initialises the LAPACK/BLAS kernels once, so that no timing pays for it."""
    for dtype in (torch.float32, torch.float64):
        matrix = torch.randn(64, 96, dtype=dtype)
        torch.linalg.svd(matrix, full_matrices=False)
        torch.linalg.eigh(matrix @ matrix.T)
        torch.linalg.qr(matrix.T)


def peak_memory(shape, rank, vertical_first):
    """Peak resident set size, during the call, of a fresh Python process that imports torch and lowrank,
    builds the weight and runs ``spatial_factors`` once; and that peak minus the process's resident set
    size just before the call (the memory the call itself adds). In bytes."""
    arguments = json.dumps([*shape, rank, vertical_first, torch.get_num_threads()])
    output = subprocess.run([sys.executable, "-c", MEMORY_CHILD, arguments], capture_output=True, text=True, check=True)
    usage = json.loads(output.stdout)
    return usage["peak_kib"] * 1024, (usage["peak_kib"] - usage["before_kib"]) * 1024


def compose_spatial(first, last):
    """The kernel of conv(first) followed by conv(last), for one (k, 1) and one (1, k) kernel."""
    _, in_ch, a, b = first.shape
    out_ch, _, c, d = last.shape
    return torch.einsum("riab,orcd->oiacbd", first.double(), last.double()).reshape(out_ch, in_ch, a * c, b * d)


def bench_spatial(shape, args):
    conv = make_conv(shape)
    weight = conv.weight.detach()
    method, policy = METHODS["spatial"], RankPolicy()
    ranks, reason = policy.choose_ranks(method, conv, policy.default)
    if ranks is None:
        raise RuntimeError(f"the default policy leaves {show_shape(shape)} alone: {reason}")
    (rank,) = ranks
    vertical_first = method.vertical_first(conv)
    (first, last), seconds = timed(lambda: F.spatial_factors(weight, rank, vertical_first), args.repeats)
    error = relative_error(compose_spatial(first, last), weight)

    unfolding = F.spatial_unfold(weight, vertical_first).double()
    if max(unfolding.shape) <= args.full_svd_max_dim:
        (_, values, _), svd_seconds = timed(lambda: torch.linalg.svd(unfolding, full_matrices=False), args.repeats)
        reference, reference_seconds = "torch.linalg.svd (float64)", svd_seconds
    else:  # only the singular values, from the eigenvalues of the smaller Gram matrix
        small = unfolding if unfolding.shape[0] <= unfolding.shape[1] else unfolding.T
        squares, reference_seconds = timed(lambda: torch.linalg.eigvalsh(small @ small.T), 1)
        values, svd_seconds = squares.flip(0).clamp_min(0).sqrt(), None
        reference = "torch.linalg.eigvalsh(M @ M.T) (float64); full SVD skipped (too slow)"
    optimal = (values[rank:].square().sum().sqrt() / unfolding.norm()).item()
    peak, added = peak_memory(shape, rank, vertical_first)
    return {
        "shape": shape,
        "rank": rank,
        "vertical_first": vertical_first,
        "unfolding": tuple(unfolding.shape),
        "seconds": seconds,
        "full_svd_seconds": svd_seconds,
        "optimal_reference": reference,
        "optimal_reference_seconds": reference_seconds,
        "peak_rss_bytes": peak,
        "added_rss_bytes": added,
        "error": error,
        "optimal_error": optimal,
        "error_ratio": error / optimal,
    }


def bench_tucker2(shape, args):
    weight = make_conv(shape).weight.detach()
    out_ch, in_ch = shape[:2]
    in_rank, out_rank = in_ch // 2, out_ch // 2
    result = {"shape": shape, "in_rank": in_rank, "out_rank": out_rank, "dtype": str(weight.dtype)}
    if max(out_ch, in_ch) > args.tucker2_max_channels:
        return {**result, "skipped": f"more than --tucker2-max-channels={args.tucker2_max_channels}"}
    (core, u_out, u_in), seconds = timed(lambda: F.tucker2(weight, in_rank, out_rank), args.repeats)
    result.update(seconds=seconds, error=relative_error(torch.einsum("srhw,os,ir->oihw", core, u_out, u_in), weight))
    if max(out_ch, in_ch) > args.tensorly_max_channels:
        return {**result, "tensorly_skipped": f"more than --tensorly-max-channels={args.tensorly_max_channels}"}
    ((core, factors), errors), tl_seconds = timed(
        lambda: partial_tucker(weight, rank=[out_rank, in_rank], modes=[0, 1]), args.repeats
    )
    rebuilt = multi_mode_dot(core.double(), [factor.double() for factor in factors], modes=[0, 1])
    return {
        **result,
        "tensorly_seconds": tl_seconds,
        "tensorly_iterations": len(errors),
        "tensorly_error": relative_error(rebuilt, weight),
        "speedup": tl_seconds / seconds,
    }


def bench_full_rank():
    """Each method at full ranks, built module by module as auto_decomposition does, against the dense layer."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(256, 512), nn.Conv2d(64, 96, 3, padding=1)
    cases = (
        ("svd", linear, torch.randn(8, 256)),
        ("svd", conv, torch.randn(2, 64, 16, 16)),
        ("spatial", conv, torch.randn(2, 64, 16, 16)),
        ("tucker2", conv, torch.randn(2, 64, 16, 16)),
    )
    rows = []
    with torch.no_grad():
        for name, layer, sample in cases:
            method = METHODS[name]
            ranks = method.full_ranks(layer)
            replacement = nn.Sequential(*(build_module(spec) for spec in method.specs(layer, ranks)))
            for module, weight in zip(replacement, method.weights(layer, ranks)):
                module.weight.copy_(weight.float())
            replacement[-1].bias.copy_(layer.bias)
            dense = layer(sample)
            error = ((replacement(sample) - dense).norm() / dense.norm()).item()
            rows.append({"method": name, "layer": repr(layer), "ranks": ranks, "error": error})
    return rows


def bench_model(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    sample = torch.randn(1, 3, 224, 224)
    params, flops = lowrank.count_parameters(model), lowrank.count_flops(model, sample)
    start = time.perf_counter()
    _, changes = lowrank.auto_decomposition(model)
    seconds = time.perf_counter() - start
    return {
        "model": name,
        "seconds": seconds,
        "layers_decomposed": len(changes),
        "params_before": params,
        "params_after": lowrank.count_parameters(model),
        "macs_before": flops,
        "macs_after": lowrank.count_flops(model, sample),
    }


def check_targets(results):
    """``(target, measured, PASS/FAIL)`` for every target the run measured."""
    checks = []
    for row in results["spatial"]:
        checks.append(
            (
                f"spatial {show_shape(row['shape'])}: error within 1% of optimal",
                f"ratio {row['error_ratio']:.4f} <= {SPATIAL_MAX_ERROR_RATIO}",
                verdict(row["error_ratio"] <= SPATIAL_MAX_ERROR_RATIO),
            )
        )
        if tuple(row["shape"]) == LARGE_SHAPE:
            checks.append(
                (
                    f"spatial {show_shape(LARGE_SHAPE)}: time",
                    f"{row['seconds']:.1f} s < {LARGE_MAX_SECONDS:.0f} s",
                    verdict(row["seconds"] < LARGE_MAX_SECONDS),
                )
            )
            gib = row["peak_rss_bytes"] / 2**30
            checks.append(
                (
                    f"spatial {show_shape(LARGE_SHAPE)}: peak RSS of the whole process",
                    f"{gib:.2f} GiB < {LARGE_MAX_GIB:.0f} GiB",
                    verdict(gib < LARGE_MAX_GIB),
                )
            )
    for row in results["tucker2"]:
        if "tensorly_error" not in row:
            continue
        checks.append(
            (
                f"tucker2 {show_shape(row['shape'])}: error <= tensorly's (+{TUCKER2_ERROR_SLACK:g} relative)",
                f"{row['error']:.6f} vs {row['tensorly_error']:.6f}",
                verdict(row["error"] <= row["tensorly_error"] * (1 + TUCKER2_ERROR_SLACK)),
            )
        )
        if tuple(row["shape"]) == TUCKER2_SPEEDUP_SHAPE:
            checks.append(
                (
                    f"tucker2 {show_shape(row['shape'])}: >= {TUCKER2_MIN_SPEEDUP:.0f}x faster than tensorly",
                    f"{row['speedup']:.2f}x",
                    verdict(row["speedup"] >= TUCKER2_MIN_SPEEDUP),
                )
            )
    for row in results["full_rank"]:
        layer = row["layer"].split("(")[0]
        checks.append(
            (
                f"full rank {row['method']} on {layer}: relative output error",
                f"{row['error']:.2e} < {FULL_RANK_MAX_ERROR:g}",
                verdict(row["error"] < FULL_RANK_MAX_ERROR),
            )
        )
    model = results["model"]
    if model["model"] == "resnet50":
        checks.append(
            (
                "resnet50 auto_decomposition time",
                f"{model['seconds']:.2f} s < {RESNET_MAX_SECONDS:.0f} s",
                verdict(model["seconds"] < RESNET_MAX_SECONDS),
            )
        )
    return checks


def report(results):
    info = results["machine"]
    lines = [
        f"Machine: {info['cpu']}, {info['nproc']} CPUs, torch {info['torch']} ({info['torch_threads']} threads"
        f"{''.join(f', {name}={value}' for name, value in info['openmp_environment'].items())}), "
        f"tensorly {info['tensorly']}, {info['date']}; load average {info['load_average_at_start'][0]:.2f} at start, "
        f"{info['load_average_at_end'][0]:.2f} at end",
        "Weights: nn.Conv2d default init (kaiming uniform) under torch.manual_seed(0), float32. "
        "Times: best of up to --repeats runs, wall clock.",
        "",
        "spatial at the default policy's rank (ratio=0.3 of FLOPs); errors are ||W - W_hat||_F / ||W||_F;",
        "optimal = exact truncation of the same unfolding (float64 singular values); peak RSS = VmHWM of a fresh",
        "process (python + torch + weight) during one spatial_factors call; 'added' = peak minus the RSS before it",
        table(SPATIAL_COLUMNS, [_spatial_row(r) for r in results["spatial"]]),
        "",
        "tucker2 at half ranks vs tensorly.partial_tucker (pytorch backend, defaults); both get the float32 kernel:",
        "both iterate in float32 (ours again in float64 when its error is below 1e-2);",
        "factors cast to float64 for the error",
        table(TUCKER2_COLUMNS, [_tucker2_row(r) for r in results["tucker2"]]),
        "",
        "Full-rank exactness: float32 replacement vs dense layer on a random input, ||y - y_dense|| / ||y_dense||",
        table(
            ["method", "layer", "ranks", "rel. error"],
            [[r["method"], r["layer"], list(r["ranks"]), f"{r['error']:.2e}"] for r in results["full_rank"]],
        ),
        "",
        _model_line(results["model"]),
        "",
        "Targets",
        table(["target", "measured", "verdict"], [list(check) for check in results["targets"]]),
    ]
    return "\n".join(lines)


SPATIAL_COLUMNS = (
    "shape",
    "rank",
    "ours (s)",
    "LAPACK SVD (s)",
    "peak RSS (MiB)",
    "added (MiB)",
    "ours err",
    "optimal err",
    "ratio",
)
TUCKER2_COLUMNS = (
    "shape",
    "ranks",
    "ours (s)",
    "tensorly (s)",
    "tensorly iters",
    "ours err",
    "tensorly err",
    "speed-up",
)


def _spatial_row(row):
    return [
        show_shape(row["shape"]),
        row["rank"],
        f"{row['seconds']:.3f}",
        "skipped (too slow)" if row["full_svd_seconds"] is None else f"{row['full_svd_seconds']:.3f}",
        f"{row['peak_rss_bytes'] / 2**20:.0f}",
        f"{row['added_rss_bytes'] / 2**20:.0f}",
        f"{row['error']:.6f}",
        f"{row['optimal_error']:.6f}",
        f"{row['error_ratio']:.4f}",
    ]


def _tucker2_row(row):
    ranks = f"{row['in_rank']},{row['out_rank']}"
    if "skipped" in row:
        return [show_shape(row["shape"]), ranks, f"skipped ({row['skipped']})", "-", "-", "-", "-", "-"]
    if "tensorly_skipped" in row:
        return [
            show_shape(row["shape"]),
            ranks,
            f"{row['seconds']:.3f}",
            f"skipped ({row['tensorly_skipped']})",
            "-",
            f"{row['error']:.6f}",
            "-",
            "-",
        ]
    return [
        show_shape(row["shape"]),
        ranks,
        f"{row['seconds']:.3f}",
        f"{row['tensorly_seconds']:.3f}",
        row["tensorly_iterations"],
        f"{row['error']:.6f}",
        f"{row['tensorly_error']:.6f}",
        f"{row['speedup']:.2f}x",
    ]


def _model_line(model):
    return (
        f"{model['model']} default auto_decomposition (spatial, ratio=0.3): {model['seconds']:.2f} s, "
        f"{model['layers_decomposed']} layers decomposed, "
        f"params {model['params_before']:,} -> {model['params_after']:,}, "
        f"MACs {model['macs_before']:,} -> {model['macs_after']:,} (1x3x224x224)"
    )


def plot(results, path):
    """Times (log scale) and errors per kernel shape: ours against LAPACK's SVD and tensorly."""
    plt = pyplot()
    figure, (times, errors) = plt.subplots(1, 2, figsize=(11, 4))
    spatial, tucker2 = results["spatial"], {tuple(row["shape"]): row for row in results["tucker2"]}
    labels = [show_shape(row["shape"]) for row in spatial]
    series = {
        "spatial (ours)": [row["seconds"] for row in spatial],
        "full LAPACK SVD (AMCT's way)": [row["full_svd_seconds"] for row in spatial],
        "tucker2 (ours)": [tucker2.get(tuple(row["shape"]), {}).get("seconds") for row in spatial],
        "tensorly partial_tucker": [tucker2.get(tuple(row["shape"]), {}).get("tensorly_seconds") for row in spatial],
    }
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        positions = [x + (index - (len(series) - 1) / 2) * width for x in range(len(labels))]
        kept = [(position, value) for position, value in zip(positions, values) if value is not None]
        times.bar([position for position, _ in kept], [value for _, value in kept], width, label=label)
    times.set_yscale("log")
    times.set_xticks(range(len(labels)), labels, fontsize=7)
    times.set_ylabel("seconds (missing bar: skipped)")
    times.set_title("Decomposition time per kernel")
    times.legend(fontsize=7)
    errors.bar(range(len(labels)), [row["error_ratio"] for row in spatial], color="tab:blue")
    errors.axhline(SPATIAL_MAX_ERROR_RATIO, color="tab:red", linestyle="--", label="target")
    errors.set_ylim(0.99, max(SPATIAL_MAX_ERROR_RATIO, *(row["error_ratio"] for row in spatial)) + 0.005)
    errors.set_xticks(range(len(labels)), labels, fontsize=7)
    errors.set_ylabel("spatial error / optimal error")
    errors.set_title("spatial at the default rank: error / optimal error")
    errors.legend(fontsize=7)
    save_figure(figure, path)


def main(args):
    if args.replot:
        path = Path(args.replot).with_suffix(".png")
        plot(json.loads(Path(args.replot).read_text()), path)
        print(f"Saved {path}")
        return
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    lowrank.set_logger_level("warning")
    tensorly.set_backend("pytorch")
    shapes = args.shapes
    if args.quick:
        cout, cin, kh, kw = shapes[0]
        shapes = [(max(cout // QUICK_CHANNEL_DIVISOR, 1), max(cin // QUICK_CHANNEL_DIVISOR, 1), kh, kw)]
    model = args.model or ("resnet18" if args.quick else "resnet50")
    output = output_path(args, "decompose_speed")

    results = {"command": command_line(), "machine": machine_info(tensorly=tensorly.__version__), "args": vars(args)}
    warm_up()
    results["spatial"] = []
    for shape in shapes:
        print(f"spatial {show_shape(shape)} ...", flush=True)
        results["spatial"].append(bench_spatial(shape, args))
    results["tucker2"] = []
    for shape in shapes:
        print(f"tucker2 {show_shape(shape)} ...", flush=True)
        results["tucker2"].append(bench_tucker2(shape, args))
    print("full-rank exactness ...", flush=True)
    results["full_rank"] = bench_full_rank()
    print(f"{model} auto_decomposition ...", flush=True)
    results["model"] = bench_model(model)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = check_targets(results)

    print()
    print(report(results))
    save_json(results, Path(output))
    print(f"\nSaved {output}")
    plot(results, Path(output).with_suffix(".png"))
    print(f"Saved {Path(output).with_suffix('.png')}")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="lowrank decomposition benchmark", add_help=add_help)
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=list(SHAPES),
        metavar="COUT,CIN,KH,KW",
        help=f"kernel shapes to benchmark (default: {' '.join(','.join(map(str, s)) for s in SHAPES)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: only the first shape, its channels divided by {QUICK_CHANNEL_DIVISOR}, "
        "resnet18, 1 thread (default: False)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help=f"best of up to this many runs per timing, fewer past {TIME_BUDGET_S:.0f} s (default: 3)",
    )
    parser.add_argument(
        "--full-svd-max-dim",
        type=int,
        default=3072,
        help="time the full LAPACK SVD of an unfolding only up to this size; larger ones get their "
        "singular values from eigvalsh(M @ M.T) (default: 3072)",
    )
    parser.add_argument(
        "--tucker2-max-channels",
        type=int,
        default=1024,
        help="skip tucker2 on kernels with more channels (default: 1024)",
    )
    parser.add_argument(
        "--tensorly-max-channels",
        type=int,
        default=1024,
        help="skip tensorly on kernels with more channels (default: 1024)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="torchvision model for the whole-model run (default: resnet50, resnet18 with --quick)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's default, 1 with --quick)"
    )
    add_output_argument(parser, "decompose_speed")
    add_replot_argument(parser, "PNG")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
