"""The AMCT sample's MNIST flow on 2 CPU processes, measured through the real recipes.

    python benchmarks/mnist_flow.py --data-path ../shared/data

Runs, each with ``accelerate launch --config_file recipes/configs/cpu_2proc.yaml`` and the seed's
global batch of 256 (``--train-batch-size 128`` per process), otherwise default flags: the baseline,
the online decomposition + finetuning (cold), the offline flow (step 1 ``decompose_model.py``, step 2
on 2 processes) and the online run again with the same inputs (its decomposition is reused). Prints
and saves test accuracy, parameters and FLOPs of each, and the time from process start to the first
training step. Targets (issue "launch runner and MNIST recipes"): baseline >= 97.8%, online and
offline >= 98.2% and never below the baseline, conv2 >= 2.5x cheaper, the cached online run at most
2 s later to its first step than the offline one.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RECIPES, ROOT, add_data_path_argument, launch_recipe


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_path_argument(parser)
    parser.add_argument(
        "--output-dir", default="runs/benchmark_mnist", help="where the runs write (default: runs/benchmark_mnist)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run (default: 200)")
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "results" / "mnist_flow.json"),
        help="JSON written (default: benchmarks/results/mnist_flow.json)",
    )
    return parser


def main(args):
    out = Path(args.output_dir)
    common = ["--data-path", args.data_path, "--train-batch-size", 128, "--steps", args.steps]
    baseline = out / "baseline" / "baseline.pth"
    offline_paths = [
        "--decompose-info-path",
        out / "offline" / "decompose_info.json",
        "--decomposed-weights-path",
        out / "offline" / "decomposed_weights.pth",
    ]
    timings = {
        "baseline": launch_recipe(
            "mnist_baseline.py", *common, "--output-dir", out / "baseline", "--save-path", baseline
        ),
        "online": launch_recipe(
            "mnist_online.py", *common, "--pretrained-path", baseline, "--output-dir", out / "online"
        ),
    }
    subprocess.run(
        [sys.executable, str(RECIPES / "decompose_model.py"), "--pretrained-path", baseline, *offline_paths],
        check=True,
        cwd=ROOT,
    )
    timings["offline"] = launch_recipe("mnist_offline.py", *common, *offline_paths, "--output-dir", out / "offline")
    # Same inputs and artifact paths as the cold online run: its decomposition is reused.
    cached_paths = [
        "--decompose-info-path",
        out / "online" / "decompose_info.json",
        "--decomposed-weights-path",
        out / "online" / "decomposed_weights.pth",
    ]
    timings["online_cached"] = launch_recipe(
        "mnist_online.py",
        *common,
        "--pretrained-path",
        baseline,
        *cached_paths,
        "--output-dir",
        out / "online_cached",
    )
    assert "[lowrank] auto_decomposition start." not in timings["online_cached"]["log"]

    rows = {}
    for name, timing in timings.items():
        results = json.loads((out / name / "results.json").read_text())
        rows[name] = {**results, "first_step_s": timing["first_step_s"], "wall_s": timing["wall_s"]}
    base = rows["baseline"]
    print(f"\n{'run':<14} {'accuracy':>9} {'params':>9} {'FLOPs':>12} {'FLOPs cut':>9} {'first step':>10}")
    for name, row in rows.items():
        print(
            f"{name:<14} {100 * row['accuracy']:>8.2f}% {row['params']:>9,} {row['flops']:>12,} "
            f"{base['flops'] / row['flops']:>8.2f}x {row['first_step_s']:>9.2f}s"
        )
    checks = {
        "baseline >= 97.8%": base["accuracy"] >= 0.978,
        "online >= 98.2% and >= baseline": rows["online"]["accuracy"] >= max(0.982, base["accuracy"]),
        "offline >= 98.2% and >= baseline": rows["offline"]["accuracy"] >= max(0.982, base["accuracy"]),
        "cached online first step <= offline + 2 s": rows["online_cached"]["first_step_s"]
        <= rows["offline"]["first_step_s"] + 2,
    }
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(
        json.dumps(
            {
                "runs": rows,
                "checks": checks,
                "steps": args.steps,
                "date": time.strftime("%Y-%m-%d"),
                "nproc": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
