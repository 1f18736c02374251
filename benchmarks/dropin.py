"""lowrank as a drop-in for msModelSlim and AMCT, measured: msModelSlim's own calls side by side with
the real msModelSlim (its PyPI package, in this process, on the same model), and AMCT's choice.

    .venv/bin/python benchmarks/dropin.py            # ResNet-50 at 224x224 (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/dropin.py --quick    # ResNet-18 at 64x64, the smoke test (a few minutes)

For ``Decompose(model).from_ratio(0.5)`` without and with ``datasets`` (``--batches`` batches of
``--batch-size`` random images), and ``from_vbmf()`` (``--calls`` picks some): each tool's time
(choosing the configuration, then ``decompose_network``), whether the configurations are identical,
and each decomposed model's relative output error ``||f_decomposed(x) - f(x)|| / ||f(x)||`` on a
held-out batch. Targets: identical configurations, lowrank at least 20x faster than msModelSlim at an
error no worse than its own (x1.001). Then AMCT's choice, ``auto_decomposition(model)``: time, layers
and ranks, on the same model and on the AMCT sample's MNIST network. Weights are random (torchvision's
initialisation, seed 0): no pretrained weights are reachable here. Prints the tables and saves JSON and
a PNG under benchmarks/results/.
"""

import argparse
import copy
import logging
import os
import sys
import time
from importlib.metadata import version

import torch
import torchvision
from common import (
    add_output_argument,
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
from msmodelslim.pytorch import low_rank_decompose as msmodelslim

import lowrank
from launch.mnist import Net
from lowrank.msmodelslim import config_json

SPEED_TARGET = 20.0
ERROR_TARGET = 1.001  # lowrank's error at most msModelSlim's times this
CALLS = {
    "from_ratio(0.5)": lambda decomposer: decomposer.from_ratio(0.5),
    "from_ratio(0.5), datasets": lambda decomposer: decomposer.from_ratio(0.5),
    "from_vbmf()": lambda decomposer: decomposer.from_vbmf(),
}


def relative_error(model, dense_output, x) -> float:
    with torch.no_grad():
        return ((model(x) - dense_output).norm() / dense_output.norm()).item()


def run_tool(tool, model, call, datasets, x, dense_output) -> dict:
    """One tool's configuration and decomposition of ``model``, timed, and the decomposed model's error."""
    start = time.perf_counter()
    decomposer = CALLS[call](tool.Decompose(model))
    chosen = time.perf_counter()
    decomposed = decomposer.decompose_network(datasets=datasets).eval()
    done = time.perf_counter()
    return {
        "config_s": chosen - start,
        "decompose_s": done - chosen,
        "total_s": done - start,
        "config": config_json(decomposer.decompose_config),
        "params": lowrank.count_parameters(decomposed),
        "error": relative_error(decomposed, dense_output, x),
    }


def compare_msmodelslim(model, datasets, x, calls) -> dict:
    with torch.no_grad():
        dense_output = model(x)
    results = {}
    for call in calls:
        data = datasets if "datasets" in call else None
        print(f"{call}: msModelSlim ...", flush=True)
        theirs = run_tool(msmodelslim, model, call, data, x, dense_output)
        print(f"{call}: lowrank ...", flush=True)
        ours = run_tool(lowrank, model, call, data, x, dense_output)
        results[call] = {
            "msmodelslim": theirs,
            "lowrank": ours,
            "same_config": ours["config"] == theirs["config"],
            "layers": len(ours["config"]),
            "speedup": theirs["total_s"] / ours["total_s"],
            "error_ratio": ours["error"] / theirs["error"] if theirs["error"] else 1.0,
        }
    return results


def amct_choice(model, x) -> dict:
    """AMCT's choice on a copy of ``model``: time, ranks and modes per layer, the output error."""
    with torch.no_grad():
        dense_output = model(x)
    model, params = copy.deepcopy(model), lowrank.count_parameters(model)
    start = time.perf_counter()
    decomposed, changes = lowrank.auto_decomposition(model)
    seconds = time.perf_counter() - start
    ranks = {name: decomposed.get_submodule(f"{name}.0").out_channels for name in changes}
    return {
        "seconds": seconds,
        "layers": len(changes),
        "ranks": ranks,
        "params": [params, lowrank.count_parameters(decomposed)],
        "error": relative_error(decomposed.eval(), dense_output, x),
    }


def plot(results, path) -> None:
    plt = pyplot()
    calls = list(results["msmodelslim"])
    figure, (times, errors) = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = range(len(calls))
    for offset, tool in ((-0.2, "msmodelslim"), (0.2, "lowrank")):
        times.bar(
            [p + offset for p in positions],
            [results["msmodelslim"][c][tool]["total_s"] for c in calls],
            0.4,
            label=tool,
        )
        errors.bar(
            [p + offset for p in positions], [results["msmodelslim"][c][tool]["error"] for c in calls], 0.4, label=tool
        )
    for axis, label in ((times, "seconds (log)"), (errors, "relative output error")):
        axis.set_xticks(list(positions), calls, fontsize=8)
        axis.set_ylabel(label)
        axis.legend()
    times.set_yscale("log")
    figure.suptitle(f"Decompose({results['model']}) side by side with msModelSlim", fontsize=10)
    save_figure(figure, path)


def main(args) -> int:
    logging.getLogger("msmodelslim").setLevel(logging.WARNING)
    lowrank.set_logger_level("warning")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or ("resnet18" if args.quick else "resnet50")
    size = args.image_size or (64 if args.quick else 224)
    # --quick: enough images that even layer4's 2x2 maps give full-rank input statistics (the input
    # factor divides by their eigenvalues: a singular one leaves float32 noise in its null space).
    batches = args.batches or (5 if args.quick else 8)
    batch_size = args.batch_size or (32 if args.quick else 8)
    generator = torch.Generator().manual_seed(1)
    datasets = [(torch.randn(batch_size, 3, size, size, generator=generator),) for _ in range(batches)]
    x = torch.randn(batch_size, 3, size, size, generator=generator)  # held out
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    results = {
        "machine": machine_info(msmodelslim=version("msmodelslim")),
        "command": command_line(),
        "model": name,
        "image_size": size,
        "calibration": {"batches": batches, "batch_size": batch_size},
    }
    results["msmodelslim"] = compare_msmodelslim(model, datasets, x, args.calls)
    results["amct"] = {name: amct_choice(model, x), "mnist_net": amct_choice(Net().eval(), torch.randn(8, 1, 28, 28))}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print(machine_line(results["machine"]))
    print(f"$ {results['command']}\n")
    rows = []
    for call, row in results["msmodelslim"].items():
        theirs, ours = row["msmodelslim"], row["lowrank"]
        rows.append(
            [
                call,
                row["layers"],
                "yes" if row["same_config"] else "NO",
                f"{theirs['total_s']:.2f}",
                f"{ours['total_s']:.2f} ({ours['config_s']:.2f} + {ours['decompose_s']:.2f})",
                f"{row['speedup']:.1f}x",
                f"{theirs['error']:.6f}",
                f"{ours['error']:.6f}",
            ]
        )
    header = ["call", "layers", "same config", "msModelSlim s", "lowrank s (config + decompose)", "speed-up"]
    print(table(header + ["msModelSlim error", "lowrank error"], rows))
    print()
    for model_name, amct in results["amct"].items():
        ranks = sorted(set(amct["ranks"].values()))
        print(
            f"AMCT's choice on {model_name}: {amct['layers']} layers in {amct['seconds']:.2f} s, ranks {ranks}, "
            f"parameters {amct['params'][0]:,} -> {amct['params'][1]:,}, output error {amct['error']:.4f}"
        )
    checks = [(f"{call}: identical configuration", row["same_config"]) for call, row in results["msmodelslim"].items()]
    checks += [
        (
            f"{call}: error <= msModelSlim's x{ERROR_TARGET} ({row['error_ratio']:.6f})",
            row["error_ratio"] <= ERROR_TARGET,
        )
        for call, row in results["msmodelslim"].items()
    ]
    checks += [
        (f"{call}: >= {SPEED_TARGET:.0f}x faster ({row['speedup']:.1f}x)", row["speedup"] >= SPEED_TARGET)
        for call, row in results["msmodelslim"].items()
    ]
    results["targets"] = {label: ok for label, ok in checks}
    print("\nTargets" + (" (timings from --quick are not the target's)" if args.quick else ""))
    for label, ok in checks:
        print(f"  {verdict(ok)}  {label}")
    path = output_path(args, "dropin")
    save_json(results, path)
    plot(results, path.with_suffix(".png"))
    print(f"\nSaved {path} and {path.with_suffix('.png')}")
    return 0


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at 64x64, 5 batches of 32 (default: off)")
    parser.add_argument("--model", default=None, help="torchvision model (default: resnet50, resnet18 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: 224, 64 with --quick)")
    parser.add_argument("--batches", type=int, default=None, help="calibration batches (default: 8, 5 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 8, 32 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--calls",
        nargs="+",
        choices=list(CALLS),
        default=list(CALLS),
        help="msModelSlim's calls compared (default: all)",
    )
    add_output_argument(parser, "dropin")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
