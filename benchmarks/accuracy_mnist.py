"""Accuracy of the AMCT sample's MNIST network before and after decomposition, and after finetuning,
for each method and rank policy, through the real recipes on 2 CPU processes.

Run from the repository root (about an hour on 2 idle CPU cores):

    .venv/bin/python benchmarks/accuracy_mnist.py --data-path ../shared/data
    .venv/bin/python benchmarks/accuracy_mnist.py --data-path ../shared/data --quick   # smoke test

Every run is ``accelerate launch --config_file recipes/configs/cpu_2proc.yaml`` with
``--train-batch-size 128`` per process (the seed's global batch of 256) and each recipe's own
defaults otherwise (Adam, lr 0.01 for the baseline, 0.001 for finetuning), and each reports its
test accuracy, parameters and FLOPs in ``results.json``:

1. the baseline, ``recipes/mnist_baseline.py --steps <--steps>``;
2. for each method (``--methods``) and policy (``--policies``): the decomposed network before
   finetuning (``--steps 0``: decompose, then only the test), then finetuned for ``--steps`` steps
   from the same decomposition: ``recipes/mnist_online.py --method M`` with the policy's flag
   (``--ratio R``, ``--energy E`` or ``--vbmf``); the second run reuses the first one's artifacts.

``--reuse`` takes the runs already in ``--output-dir`` (an interrupted benchmark, or one rerun with
more policies) instead of running them again. Prints a table, saves JSON
(``benchmarks/results/accuracy_mnist.json``) and a plot of accuracy against the FLOPs ratio
(``benchmarks/results/accuracy_mnist.png``).
"""

import argparse
import json
import os
from pathlib import Path

from common import (
    add_data_path_argument,
    add_output_argument,
    command_line,
    launch_recipe,
    machine_info,
    machine_line,
    output_path,
    publish,
    pyplot,
    save_figure,
    table,
)

POLICIES = {  # the recipe's flags, in the order they run: the default first
    "ratio=0.3": ["--ratio", 0.3],
    "vbmf": ["--vbmf"],
    "energy=0.9": ["--energy", 0.9],
    "ratio=0.5": ["--ratio", 0.5],
    "ratio=0.2": ["--ratio", 0.2],
}
QUICK_STEPS = 2


def results_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def run(recipe, *flags, output_dir: Path, reuse: bool) -> dict:
    """``recipe``'s results, from a new run or, with ``reuse``, from an earlier run's ``results.json``."""
    if not (reuse and (output_dir / "results.json").is_file()):
        launch_recipe(recipe, *flags, "--output-dir", output_dir)
    return results_of(output_dir)


def run_policy(method, name, baseline, common, out, reuse):
    """Accuracy before and after finetuning for one method and policy, and the decomposition's ranks."""
    folder = out / f"{method}_{name}"
    info, weights = folder / "decompose_info.json", folder / "decomposed_weights.pth"
    artifacts = ["--decompose-info-path", info, "--decomposed-weights-path", weights]
    recipe = "mnist_online.py"
    flags = ["--pretrained-path", baseline, "--method", method, *POLICIES[name], *artifacts]
    runs = {
        stage: run(recipe, *common["flags"], "--steps", steps, *flags, output_dir=folder / stage, reuse=reuse)
        for stage, steps in (("before", 0), ("finetuned", common["steps"]))
    }
    layers = json.loads(info.read_text())["layers"]
    return {
        "method": method,
        "policy": name,
        "recipe": recipe,
        "ranks": {layer["name"]: layer["ranks"] for layer in layers},
        "params": runs["finetuned"]["params"],
        "flops": runs["finetuned"]["flops"],
        "accuracy_before": runs["before"]["accuracy"],
        "accuracy_finetuned": runs["finetuned"]["accuracy"],
    }


COLUMNS = ("method", "policy", "ranks", "params", "FLOPs", "FLOPs ratio", "before finetune", "finetuned", "vs baseline")


def _row(row, base):
    ranks = "; ".join(f"{name} {'x'.join(map(str, ranks))}" for name, ranks in row["ranks"].items()) or "-"
    return [
        row["method"],
        row["policy"],
        ranks,
        f"{row['params']:,}",
        f"{row['flops']:,}",
        f"{row['flops'] / base['flops']:.3f}",
        f"{100 * row['accuracy_before']:.2f}%",
        f"{100 * row['accuracy_finetuned']:.2f}%",
        f"{100 * (row['accuracy_finetuned'] - base['accuracy']):+.2f}",
    ]


def report(results):
    base = results["baseline"]
    baseline_row = ["dense", "baseline", "-", f"{base['params']:,}", f"{base['flops']:,}", "1.000", "-"]
    baseline_row += [f"{100 * base['accuracy']:.2f}%", "+0.00"]
    return "\n".join(
        [
            machine_line(results["machine"]),
            f"{results['args']['steps']} training steps per run, global batch 256 on 2 processes; "
            "FLOPs = multiply-adds of one 1x28x28 sample",
            table(COLUMNS, [baseline_row, *(_row(row, base) for row in results["rows"])]),
        ]
    )


def plot(results, path):
    plt = pyplot()
    base = results["baseline"]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for method, colour in zip(dict.fromkeys(row["method"] for row in results["rows"]), ("tab:blue", "tab:orange")):
        rows = [row for row in results["rows"] if row["method"] == method]
        x = [row["flops"] / base["flops"] for row in rows]
        axes.scatter(x, [100 * row["accuracy_finetuned"] for row in rows], color=colour, label=f"{method} finetuned")
        axes.scatter(
            x, [100 * row["accuracy_before"] for row in rows], color=colour, marker="x", label=f"{method} before"
        )
        for row, flops_ratio in zip(rows, x):
            axes.annotate(row["policy"], (flops_ratio, 100 * row["accuracy_finetuned"]), fontsize=6)
    axes.axhline(100 * base["accuracy"], color="grey", linestyle="--", label="dense baseline")
    axes.set_xlabel("FLOPs ratio (decomposed / dense)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("MNIST: accuracy against FLOPs")
    axes.legend(fontsize=7)
    save_figure(figure, path)


def main(args):
    if args.quick:
        args.steps, args.methods, args.policies = QUICK_STEPS, ["spatial"], ["ratio=0.3"]
    out = Path(args.output_dir)
    output = output_path(args, "accuracy_mnist")
    results = {"command": command_line(), "machine": machine_info(), "args": vars(args), "rows": []}
    common = {
        "steps": args.steps,
        "flags": ["--data-path", args.data_path, "--train-batch-size", 128],
    }
    baseline = out / "baseline" / "baseline.pth"
    results["baseline"] = run(
        "mnist_baseline.py",
        *common["flags"],
        "--steps",
        args.steps,
        "--save-path",
        baseline,
        output_dir=out / "baseline",
        reuse=args.reuse,
    )
    for name in args.policies:  # both methods of a policy next to each other: an interrupted run compares them
        for method in args.methods:
            results["rows"].append(run_policy(method, name, baseline, common, out, args.reuse))
    results["machine"]["load_average_at_end"] = os.getloadavg()
    publish(results, output, report, plot)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_path_argument(parser)
    parser.add_argument(
        "--output-dir",
        default="runs/accuracy_mnist",
        help="where the runs write (default: runs/accuracy_mnist)",
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="steps of the baseline and of each finetuning (default: 200)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["spatial", "tucker2"],
        choices=("spatial", "tucker2"),
        help="methods for k x k convolutions (default: spatial tucker2)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=list(POLICIES),
        help=f"rank policies (default: {' '.join(POLICIES)})",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take the results of runs already in --output-dir (an interrupted benchmark, or one with fewer "
        "policies) instead of running them again (default: off)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_STEPS} steps, spatial ratio=0.3 (default: off)",
    )
    add_output_argument(parser, "accuracy_mnist")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
