"""Latency of decomposed models against the dense ones, next to their FLOPs ratios, and the
latency-aware rank policy against the FLOPs-based one.

Run from the repository root (about 30 minutes on 2 idle CPU cores):

    .venv/bin/python benchmarks/latency.py
    .venv/bin/python benchmarks/latency.py --quick    # smoke test: the MNIST net, seconds
    .venv/bin/python benchmarks/latency.py --replot benchmarks/results/latency.json   # PNGs only

Models: torchvision's ResNet-50 (1x3x224x224 per sample) and the AMCT sample's MNIST ``Net``, default
initialisation under ``torch.manual_seed(0)`` (latency and the FLOPs-based ranks do not depend on the
weights' values), in eval mode, at batches 1, 8 and 32. Settings: the CPU in float32 as PyTorch runs a
model by default (NCHW, eager: "cpu"), and as an inference deployment runs it (channels_last, batch
norm folded into the convolutions: "cpu-deploy"), on ``--threads`` threads; a GPU, when there is one,
in bfloat16 channels_last.

Variants of each model: dense; the FLOPs-based policy (``ratio=r``, each of ``--ratios``) for each of
``--methods``; the latency-aware policy (``latency=t``, each of ``--latency-targets``), which times each
layer on the device with the input it receives at batch ``--policy-batch`` and keeps only the
replacements measured within ``t`` of the dense layer's time. Every variant is timed at every batch
with ``lowrank.latency.measure`` (``torch.utils.benchmark``'s ``blocked_autorange``, at least
``--min-run-time`` seconds, under ``inference_mode``); a latency is the fastest block over
``--rounds`` rounds that time all variants in turn, so that a burst of load on a shared machine
does not favour one variant. FLOPs (multiply-adds, ``lowrank.count_flops``) are counted at batch 1;
they scale with the batch.

Target (issue "Benchmarks against the reference tools"): on the CPU at batch 8, every FLOPs-based
variant's latency ratio (decomposed / dense) is at most its FLOPs ratio + 0.15; checked in both CPU
settings.

Prints a table, saves JSON (``benchmarks/results/latency.json``) and one plot per model and setting
(``benchmarks/results/latency_<model>_<setting>.png``): latency ratio against FLOPs ratio.
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torchvision
from common import (
    add_output_argument,
    add_replot_argument,
    command_line,
    machine_info,
    machine_line,
    output_path,
    pyplot,
    save_figure,
    save_json,
    table,
    verdict,
)
from torch.fx.experimental.optimization import fuse

import lowrank
from launch.mnist import Net
from lowrank.latency import measure

# model name -> (constructor, input shape of one sample)
MODELS = {
    "resnet50": (torchvision.models.resnet50, (3, 224, 224)),
    "mnist": (Net, (1, 28, 28)),
    "resnet18": (torchvision.models.resnet18, (3, 64, 64)),
}
TARGET_BATCH, TARGET_SLACK = 8, 0.15


def devices(cpu_only: bool) -> list[dict]:
    """The measurement settings: the CPU in float32 as PyTorch runs a model by default (NCHW, eager);
    the CPU as an inference deployment runs it ("cpu-deploy": channels_last, which oneDNN's
    convolutions run without reordering, and batch norm folded into the convolutions before it); and
    the GPU in bfloat16 channels_last when there is one."""
    settings = [
        {"name": "cpu", "device": "cpu", "dtype": torch.float32, "channels_last": False, "fold_bn": False},
        {"name": "cpu-deploy", "device": "cpu", "dtype": torch.float32, "channels_last": True, "fold_bn": True},
    ]
    if torch.cuda.is_available() and not cpu_only:
        settings.append(
            {"name": "cuda", "device": "cuda", "dtype": torch.bfloat16, "channels_last": True, "fold_bn": False}
        )
    return settings


def describe(setting) -> str:
    """``cpu float32``, ``cpu float32 cl, BN folded``, ...: the setting as the table shows it."""
    dtype = str(setting["dtype"]).removeprefix("torch.")
    extras = ["cl"] * setting["channels_last"] + ["BN folded"] * setting["fold_bn"]
    return f"{setting['device']} {dtype}" + (f" {', '.join(extras)}" if extras else "")


def on(setting, tensor_or_model):
    """``tensor_or_model`` on the setting's device, dtype and memory format."""
    memory_format = torch.channels_last if setting["channels_last"] else torch.contiguous_format
    return tensor_or_model.to(device=setting["device"], dtype=setting["dtype"], memory_format=memory_format)


def example(setting, shape, batch):
    torch.manual_seed(1)
    return on(setting, torch.randn(batch, *shape))


def variants(name, setting, args):
    """``(label, policy, model, decomposition record)`` for the dense model and each policy, each model
    with batch norm folded into its convolutions where the setting says so (after decomposing: the
    policies see the model as trained)."""
    constructor, shape = MODELS[name]
    torch.manual_seed(0)
    dense = on(setting, constructor().eval())
    built = [("dense", {}, deployed(setting, dense), {"seconds": 0.0, "layers": 0})]
    policies = [{"method": method, "ratio": ratio} for method in args.methods for ratio in args.ratios]
    policies += [{"method": method, "latency": target} for method in args.methods for target in args.latency_targets]
    for policy in policies:
        label = f"{policy['method']} " + (
            f"ratio={policy['ratio']}" if "ratio" in policy else f"latency={policy['latency']}"
        )
        print(f"{name}, {describe(setting)}: {label} ...", flush=True)
        model = copy.deepcopy(dense)
        options = dict(policy)
        if "latency" in policy:
            options["example_input"] = example(setting, shape, args.policy_batch)
        started = time.perf_counter()
        _, changes = lowrank.auto_decomposition(model, **options)
        record = {"seconds": time.perf_counter() - started, "layers": len(changes)}
        built.append((label, policy, deployed(setting, model), record))
    return built


def deployed(setting, model):
    """``model`` with its batch norms folded into the preceding convolutions (``torch.fx``'s ``fuse``,
    eval mode) when the setting asks for it; the multiply-adds stay the same."""
    return fuse(model) if setting["fold_bn"] else model


def time_variants(built, x, args):
    """Per variant: the fastest block over the rounds, and the median of the last round (seconds)."""
    fastest = [float("inf")] * len(built)
    medians = [0.0] * len(built)
    for _ in range(args.rounds):
        for index, (_, _, model, _) in enumerate(built):
            measurement = measure(lambda model=model: model(x), args.min_run_time)
            fastest[index] = min(fastest[index], min(measurement.times))
            medians[index] = measurement.median
    return fastest, medians


def bench_model(name, setting, args):
    _, shape = MODELS[name]
    built = variants(name, setting, args)
    one = example(setting, shape, 1)
    flops = [lowrank.count_flops(model, one) for _, _, model, _ in built]
    rows = []
    for batch in args.batches:
        print(f"{name}, {describe(setting)}: timing batch {batch} ...", flush=True)
        fastest, medians = time_variants(built, example(setting, shape, batch), args)
        for index, (label, policy, model, record) in enumerate(built):
            rows.append(
                {
                    "model": name,
                    "setting": setting["name"],
                    "setting_description": describe(setting),
                    "device": setting["device"],
                    "dtype": str(setting["dtype"]).removeprefix("torch."),
                    "channels_last": setting["channels_last"],
                    "bn_folded": setting["fold_bn"],
                    "batch": batch,
                    "variant": label,
                    "policy": policy,
                    "layers_decomposed": record["layers"],
                    "decomposition_seconds": record["seconds"],
                    "params": lowrank.count_parameters(model),
                    "macs_per_sample": flops[index],
                    "flops_ratio": flops[index] / flops[0],
                    "seconds": fastest[index],
                    "median_seconds": medians[index],
                    "latency_ratio": fastest[index] / fastest[0],
                }
            )
    return rows


def check_targets(rows):
    checks = []
    for row in rows:
        if row["device"] == "cpu" and row["batch"] == TARGET_BATCH and "ratio" in row["policy"]:
            bound = row["flops_ratio"] + TARGET_SLACK
            checks.append(
                (
                    f"{row['model']} {row['variant']}, {row['setting_description']} batch {TARGET_BATCH}: "
                    f"latency ratio <= FLOPs ratio + {TARGET_SLACK}",
                    f"{row['latency_ratio']:.3f} <= {bound:.3f}",
                    verdict(row["latency_ratio"] <= bound),
                )
            )
    return checks


COLUMNS = (
    "model",
    "setting",
    "batch",
    "variant",
    "layers",
    "params",
    "MACs/sample",
    "FLOPs ratio",
    "ms",
    "median ms",
    "latency ratio",
    "gap",
    "decompose s",
)


def _row(row):
    return [
        row["model"],
        row["setting_description"],
        row["batch"],
        row["variant"],
        row["layers_decomposed"],
        f"{row['params']:,}",
        f"{row['macs_per_sample']:,}",
        f"{row['flops_ratio']:.3f}",
        f"{1e3 * row['seconds']:.2f}",
        f"{1e3 * row['median_seconds']:.2f}",
        f"{row['latency_ratio']:.3f}",
        f"{row['latency_ratio'] - row['flops_ratio']:+.3f}",
        f"{row['decomposition_seconds']:.1f}",
    ]


def report(results):
    return "\n".join(
        [
            machine_line(results["machine"]),
            f"Latency: fastest block over {results['args']['rounds']} round(s) of blocked_autorange "
            f"(min_run_time {results['args']['min_run_time']} s); 'median ms' is the last round's median; "
            f"FLOPs at batch 1; gap = latency ratio - FLOPs ratio; latency policies chosen at batch "
            f"{results['args']['policy_batch']}",
            table(COLUMNS, [_row(row) for row in results["rows"]]),
            "",
            "Targets",
            table(["target", "measured", "verdict"], [list(check) for check in results["targets"]]),
        ]
    )


def plot(rows, output_dir, suffix):
    """One PNG per model and setting: latency ratio against FLOPs ratio, per batch and policy kind."""
    plt = pyplot()
    paths = []
    for model, setting in dict.fromkeys((row["model"], row["setting"]) for row in rows):
        selected = [row for row in rows if row["model"] == model and row["setting"] == setting]
        figure, axes = plt.subplots(figsize=(8, 5))
        batches = sorted({row["batch"] for row in selected})
        colours = dict(zip(batches, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        kinds = dict.fromkeys((row["policy"]["method"], kind) for row in selected for kind in row["policy"])
        markers = dict(zip([kind for kind in kinds if kind[1] in ("ratio", "latency")], "o^sv<>Dp"))
        for batch in batches:
            for (method, kind), marker in markers.items():
                points = [
                    row
                    for row in selected
                    if row["batch"] == batch and row["policy"].get("method") == method and kind in row["policy"]
                ]
                axes.scatter(
                    [row["flops_ratio"] for row in points],
                    [row["latency_ratio"] for row in points],
                    marker=marker,
                    color=colours[batch],
                    label=f"batch {batch}, {method} {kind}=",
                )
                for row in points:
                    axes.annotate(str(row["policy"][kind]), (row["flops_ratio"], row["latency_ratio"]), fontsize=6)
        axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, label="latency = FLOPs")
        axes.plot([0, 1], [TARGET_SLACK, 1 + TARGET_SLACK], "--", color="grey", linewidth=0.8, label="target bound")
        axes.axhline(1, color="black", linewidth=0.5)
        axes.set_xlabel("FLOPs ratio (decomposed / dense)")
        axes.set_ylabel("latency ratio (decomposed / dense)")
        axes.set_title(f"{model}, {selected[0]['setting_description']} (labels: ratio or latency target)")
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        path = Path(output_dir) / f"latency_{model}_{setting}{suffix}.png"
        save_figure(figure, path)
        paths.append(path)
    return paths


def main(args):
    if args.replot:
        saved = json.loads(args.replot.read_text())
        for path in plot(saved["rows"], args.replot.parent, "_quick" if saved["args"]["quick"] else ""):
            print(f"Saved {path}")
        return
    if args.quick:
        args.models = args.models or ["mnist"]
        args.batches, args.ratios, args.latency_targets = [1, 2], [0.5], [0.7]
        args.methods, args.rounds, args.min_run_time, args.threads = ["spatial"], 1, 0.05, 1
    args.models = args.models or ["resnet50", "mnist"]
    torch.set_num_threads(args.threads)
    lowrank.set_logger_level("warning")
    output = output_path(args, "latency")
    results = {"command": command_line(), "machine": machine_info(), "args": vars(args), "rows": []}
    for setting in devices(args.cpu_only):
        for name in args.models:
            results["rows"] += bench_model(name, setting, args)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = check_targets(results["rows"])
    print()
    print(report(results))
    save_json(results, output)
    print(f"\nSaved {output}")
    for path in plot(results["rows"], Path(output).parent, "_quick" if args.quick else ""):
        print(f"Saved {path}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=None, help="models (default: resnet50 mnist)"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="batch sizes (default: 1 8 32)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["spatial", "tucker2"],
        choices=("spatial", "tucker2", "svd"),
        help="methods for k x k convolutions (default: spatial tucker2)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="FLOPs-based policies (default: 0.3 0.5 0.7)"
    )
    parser.add_argument(
        "--latency-targets",
        nargs="+",
        type=float,
        default=[0.5, 0.7],
        help="latency-aware policies: fraction of each layer's dense time (default: 0.5 0.7)",
    )
    parser.add_argument(
        "--policy-batch",
        type=int,
        default=TARGET_BATCH,
        help=f"batch of the example input the latency policy times layers on (default: {TARGET_BATCH})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--min-run-time", type=float, default=1.0, help="seconds of timed runs per measurement (default: 1.0)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of timing all variants (default: 2)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when there is one (default: off)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: mnist, batches 1 2, spatial ratio=0.5 and latency=0.7, 1 round of 0.05 s, 1 thread "
        "(default: off)",
    )
    add_output_argument(parser, "latency")
    add_replot_argument(parser, "PNGs")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
