"""Training throughput of the ResNet-50 recipe, dense against decomposed, in images/s.

On a GPU (what the issue asks to record; bf16 autocast, channels_last, one process):

    python benchmarks/resnet50_throughput.py

A CPU smoke run (tiny images, a few steps; what the test runs):

    python benchmarks/resnet50_throughput.py --quick

Runs ``recipes/resnet50_imagenet.py --synthetic`` (random images, so data loading is PIL decoding-free
but still goes through the standard transforms and a DataLoader) as a baseline and as online
decompositions (``tucker2`` at ratio 0.5, msModelSlim's default, and ``spatial`` at 0.3, AMCT's),
each for ``--steps`` optimizer steps, and reports the median of the throughputs the recipe logs
every ``--log-steps`` steps, without the first window (warm-up: cuDNN autotuning, allocator). The
decompositions start from a randomly initialised ResNet-50: throughput does not depend on the values.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from common import ROOT, command_line, machine_info, machine_line, pyplot, save_figure, save_json, table

from lowrank.io import save_state_dict

RECIPE = ROOT / "recipes" / "resnet50_imagenet.py"
VARIANTS = {  # name: the recipe's flags
    "dense": [],
    "tucker2 0.5": ["--tensor-decompose", "--method", "tucker2", "--ratio", "0.5"],
    "spatial 0.3": ["--tensor-decompose", "--method", "spatial", "--ratio", "0.3"],
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 32x32 images, 3 steps (default: off)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step on the GPU (default: 256)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: 60)")
    parser.add_argument("--log-steps", type=int, default=10, help="steps per throughput window (default: 10)")
    parser.add_argument("--workers", type=int, default=12, help="data loading processes (default: 12)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file to write, PNG next to it (default: benchmarks/results/resnet50_throughput.json, "
        "resnet50_throughput_quick.json with --quick)",
    )
    return parser


def run_recipe(flags, pretrained, output_dir) -> list[float]:
    """The images/s of every logged window of one run of the recipe."""
    command = [sys.executable, str(RECIPE), *map(str, flags), "--pretrained-path", str(pretrained)]
    command += ["--output-dir", str(output_dir)]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    if result.returncode != 0:
        sys.exit(f"the recipe failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return [
        float(value) for value in re.findall(r"\[Train\] Step\[\d+/\d+\] Loss: \S+, ([\d.]+) images/s", result.stdout)
    ]


def main(args):
    gpu = torch.cuda.is_available() and not args.quick
    if args.quick:
        common = ["--image-size", "32", "--train-batch-size", "4", "--steps", "3", "--log-steps", "1"]
        common += ["--workers", "0"]
    else:
        common = ["--image-size", "224", "--train-batch-size", args.batch_size, "--steps", args.steps]
        common += ["--log-steps", args.log_steps, "--workers", args.workers]
    common = ["--synthetic", "--lr-warmup-epochs", "0", *common]
    common += ["--use-gpu", "--mixed-precision", "bf16", "--channels-last"] if gpu else ["--mixed-precision", "no"]
    info = machine_info()
    print(machine_line(info))
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        pretrained = Path(scratch) / "resnet50.pth"
        save_state_dict(torchvision.models.resnet50(num_classes=10).state_dict(), pretrained)
        for name, flags in VARIANTS.items():
            windows = run_recipe([*common, *flags], pretrained, Path(scratch) / name.replace(" ", "_"))
            results = json.loads((Path(scratch) / name.replace(" ", "_") / "results.json").read_text())
            measured = windows[1:] or windows
            rows[name] = {"images_per_s": statistics.median(measured), "windows": windows, **results}
    dense = rows["dense"]
    header = ["model", "images/s", "speed-up", "params", "MACs (1 image)", "MACs cut"]
    lines = [
        [
            name,
            f"{row['images_per_s']:.1f}",
            f"{row['images_per_s'] / dense['images_per_s']:.2f}x",
            f"{row['params']:,}",
            f"{row['flops']:,}",
            f"{dense['flops'] / row['flops']:.2f}x",
        ]
        for name, row in rows.items()
    ]
    setting = "GPU, bf16, channels_last" if gpu else "CPU, float32"
    print(f"\nResNet-50 training throughput ({setting}; median of the logged windows after the first)")
    print(table(header, lines))

    output = (
        args.output or ROOT / "benchmarks" / "results" / f"resnet50_throughput{'_quick' if args.quick else ''}.json"
    )
    info["load_average_at_end"] = os.getloadavg()
    save_json({"machine": info, "command": command_line(), "setting": setting, "runs": rows}, output)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(list(rows), [row["images_per_s"] for row in rows.values()], color=["grey", "tab:blue", "tab:orange"])
    axis.set_ylabel("images/s")
    axis.set_title(f"ResNet-50 training throughput ({setting})")
    save_figure(figure, output.with_suffix(".png"))
    print(f"saved {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
