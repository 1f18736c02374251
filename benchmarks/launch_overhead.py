"""Time from launch to the first training step of the MNIST recipes on 2 CPU processes, in each mode.

Run from the repository root (a few minutes):

    .venv/bin/python benchmarks/launch_overhead.py --data-path ../shared/data
    .venv/bin/python benchmarks/launch_overhead.py --data-path ../shared/data --quick   # smoke test

Each run is ``accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_<mode>.py
--train-batch-size 128``, and the figure is the runner's own line ``[Train] first step at X s after
start``: seconds from the creation of the rank-0 worker process to its first training step (imports,
process group, data, the model of the mode). The job is interrupted right after that line, since
nothing later changes it. Modes:

- ``baseline``: the dense network;
- ``offline``: step 2 of the offline flow; its step 1 (``recipes/decompose_model.py``) runs once
  before and its wall time is reported apart;
- ``online_cold``: rank 0 decomposes behind the barrier (fresh artifact paths each time), the other
  rank waits for it and loads the result;
- ``online_cached``: the same inputs again, so the artifacts of the first cold run are reused.

The pretrained weights are the network's initialisation under ``torch.manual_seed(0)``: the time to
the first step does not depend on their values. Each mode runs ``--repeats`` times, interleaved
(baseline, offline, cold, cached, then again), so that a change of load affects them alike; the
table gives the median and the fastest.

Target (issue "launch runner and MNIST recipes"): the cached online run reaches its first step at
most 2 s after the offline one.

Prints a table, saves JSON (``benchmarks/results/launch_overhead.json``) and a bar chart
(``benchmarks/results/launch_overhead.png``).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import (
    RECIPES,
    ROOT,
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
    verdict,
)

from launch.mnist import Net
from lowrank.io import save_state_dict

MODES = ("baseline", "offline", "online_cold", "online_cached")
CACHED_SLACK_S = 2.0


def artifacts(folder: Path) -> list:
    info, weights = folder / "decompose_info.json", folder / "decomposed_weights.pth"
    return ["--decompose-info-path", info, "--decomposed-weights-path", weights]


def main(args):
    repeats = 1 if args.quick else args.repeats
    out = Path(args.output_dir)
    output = output_path(args, "launch_overhead")
    results = {"command": command_line(), "machine": machine_info(), "args": vars(args)}
    pretrained = out / "pretrained.pth"
    torch.manual_seed(0)
    save_state_dict(Net().state_dict(), pretrained)
    common = ["--data-path", args.data_path, "--train-batch-size", 128]

    started = time.perf_counter()
    offline_step1 = [sys.executable, str(RECIPES / "decompose_model.py"), "--pretrained-path", pretrained]
    subprocess.run([*map(str, offline_step1), *map(str, artifacts(out / "offline"))], check=True, cwd=ROOT)
    results["offline_step1_wall_s"] = time.perf_counter() - started

    times = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        # A cold run must find no decomposition to reuse: an earlier run of this script leaves one.
        shutil.rmtree(out / f"cold_{repeat}", ignore_errors=True)
        runs = {
            "baseline": ("mnist_baseline.py", []),
            "offline": ("mnist_offline.py", artifacts(out / "offline")),
            "online_cold": ("mnist_online.py", ["--pretrained-path", pretrained, *artifacts(out / f"cold_{repeat}")]),
            "online_cached": ("mnist_online.py", ["--pretrained-path", pretrained, *artifacts(out / "cold_0")]),
        }
        for mode, (recipe, flags) in runs.items():
            run = launch_recipe(
                recipe, *common, *flags, "--output-dir", out / f"{mode}_{repeat}", stop_at_first_step=True
            )
            decomposed = "[lowrank] auto_decomposition start." in run["log"]
            if decomposed != (mode == "online_cold"):
                sys.exit(f"{mode}: expected {'a' if mode == 'online_cold' else 'no'} decomposition:\n{run['log']}")
            times[mode].append(run["first_step_s"])
    results["first_step_s"] = times
    results["machine"]["load_average_at_end"] = os.getloadavg()
    median = {mode: statistics.median(values) for mode, values in times.items()}
    results["median_first_step_s"] = median
    results["targets"] = [
        (
            f"online cached first step <= offline + {CACHED_SLACK_S:.0f} s (medians)",
            f"{median['online_cached']:.2f} s <= {median['offline'] + CACHED_SLACK_S:.2f} s",
            verdict(median["online_cached"] <= median["offline"] + CACHED_SLACK_S),
        )
    ]
    publish(results, output, report, plot)


def report(results):
    times = results["first_step_s"]
    rows = [
        [mode, len(values), f"{statistics.median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}"]
        for mode, values in times.items()
    ]
    return "\n".join(
        [
            machine_line(results["machine"]),
            "Seconds from the rank-0 worker's creation to its first training step, 2 CPU processes; "
            f"offline step 1 (decompose_model.py, one process, wall time): {results['offline_step1_wall_s']:.2f} s",
            table(["mode", "runs", "median (s)", "fastest (s)", "slowest (s)"], rows),
            "",
            "Targets",
            table(["target", "measured", "verdict"], [list(check) for check in results["targets"]]),
        ]
    )


def plot(results, path):
    plt = pyplot()
    times = results["first_step_s"]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    modes = list(times)
    axes.bar(modes, [statistics.median(times[mode]) for mode in modes], color="tab:blue", label="median")
    for index, mode in enumerate(modes):
        axes.scatter([index] * len(times[mode]), times[mode], color="black", s=10, zorder=3)
    axes.set_ylabel("seconds to the first training step")
    axes.set_title("MNIST recipes on 2 CPU processes (dots: each run)")
    save_figure(figure, path)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_path_argument(parser)
    parser.add_argument(
        "--output-dir", default="runs/launch_overhead", help="where the runs write (default: runs/launch_overhead)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (default: 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: one run of each mode (default: off)")
    add_output_argument(parser, "launch_overhead")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
