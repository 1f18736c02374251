"""Training throughput of the ResNet-50 recipe, dense against decomposed, in images/s.

On a GPU (what the issue asks to record; bf16 autocast, channels_last, one process):

    python benchmarks/resnet50_throughput.py

A CPU smoke run (tiny images, a few steps; what the test runs):

    python benchmarks/resnet50_throughput.py --quick

Two figures per model:

- **recipe**: ``recipes/resnet50_imagenet.py --synthetic`` run as a user runs it (random images, so no
  JPEG decoding, but the standard transforms and a DataLoader with ``--workers`` processes), for
  ``--steps`` optimizer steps; the median of the throughputs the recipe logs every ``--log-steps``
  steps, without the first window (warm-up: cuDNN autotuning, allocator). Where the input pipeline is
  slower than the model, this is the pipeline's rate for every model.
- **model step**: the same training step (SGD with momentum, label smoothing, autocast, channels_last,
  cuDNN autotuning) on one batch already on the device, timed over ``--steps`` steps after
  ``--warmup`` steps: the model's own speed, with no input pipeline.

Models: the dense ResNet-50 (10 classes), ``tucker2`` at ratio 0.5 (msModelSlim's method) and
``spatial`` at 0.3 (AMCT's, the library's default), each also with ranks rounded to multiples of 8
(``--divisor 8``); ``--variants`` picks some. The decompositions start from a randomly initialised
ResNet-50: throughput does not depend on the values.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from common import ROOT, command_line, machine_info, machine_line, pyplot, save_figure, save_json, table

import lowrank
from lowrank.io import save_state_dict

RECIPE = ROOT / "recipes" / "resnet50_imagenet.py"
CLASSES = 10  # the recipe's --synthetic classes
VARIANTS = {  # name: the decomposition policy (auto_decomposition's keywords, the recipe's flags)
    "dense": None,
    "tucker2 0.5": {"method": "tucker2", "ratio": 0.5},
    "tucker2 0.5 /8": {"method": "tucker2", "ratio": 0.5, "divisor": 8},
    "spatial 0.3": {"method": "spatial", "ratio": 0.3},
    "spatial 0.3 /8": {"method": "spatial", "ratio": 0.3, "divisor": 8},
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 32x32 images, 3 steps (default: off)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step on the GPU (default: 256)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: 60)")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps before the model-step timing (default: 10)"
    )
    parser.add_argument("--log-steps", type=int, default=10, help="steps per throughput window (default: 10)")
    parser.add_argument("--workers", type=int, default=12, help="data loading processes (default: 12)")
    decomposed = [name for name in VARIANTS if name != "dense"]
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=decomposed,
        default=decomposed,
        help="decomposed models measured beside the dense one (default: all)",
    )
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


def recipe_flags(policy) -> list[str]:
    if policy is None:
        return []
    return ["--tensor-decompose", *(text for key, value in policy.items() for text in (f"--{key}", str(value)))]


def model_step_throughput(policy, batch_size, image_size, steps, warmup, device) -> float:
    """Images/s of the recipe's training step on one batch held on ``device`` (bf16 autocast and
    channels_last on a GPU, float32 on the CPU)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=CLASSES)
    if policy is not None:
        lowrank.auto_decomposition(model, **policy)
    gpu = device.type == "cuda"
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, CLASSES, (batch_size,), device=device)
    torch.backends.cudnn.benchmark = gpu

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    synchronize = torch.cuda.synchronize if gpu else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return batch_size * steps / (time.perf_counter() - started)


def main(args):
    lowrank.set_logger_level("warning")  # the recipes log their decompositions; the model-step ones need not
    gpu = torch.cuda.is_available() and not args.quick
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.log_steps, args.warmup, args.workers = 32, 4, 3, 1, 1, 0
    else:
        args.image_size = 224
    common = ["--image-size", args.image_size, "--train-batch-size", args.batch_size, "--steps", args.steps]
    common += ["--log-steps", args.log_steps, "--workers", args.workers]
    common = ["--synthetic", "--lr-warmup-epochs", "0", *common]
    common += ["--use-gpu", "--mixed-precision", "bf16", "--channels-last"] if gpu else ["--mixed-precision", "no"]
    device = torch.device("cuda" if gpu else "cpu")
    info = machine_info()
    print(machine_line(info))
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        pretrained = Path(scratch) / "resnet50.pth"
        save_state_dict(torchvision.models.resnet50(num_classes=CLASSES).state_dict(), pretrained)
        for name in ["dense", *args.variants]:
            policy = VARIANTS[name]
            output_dir = Path(scratch) / name.replace(" ", "_").replace("/", "div")
            windows = run_recipe([*common, *recipe_flags(policy)], pretrained, output_dir)
            results = json.loads((output_dir / "results.json").read_text())
            measured = windows[1:] or windows
            rows[name] = {"images_per_s": statistics.median(measured), "windows": windows, **results}
            print(f"{name}: model step ...", flush=True)
            rows[name]["model_step_images_per_s"] = model_step_throughput(
                policy, args.batch_size, args.image_size, args.steps, args.warmup, device
            )
            if gpu:  # the next variant's recipe process gets the GPU's memory, as the first one did
                torch.cuda.empty_cache()
    dense = rows["dense"]
    header = ["model", "recipe images/s", "speed-up", "model step images/s", "speed-up", "params", "MACs (1 image)"]
    header += ["MACs cut"]
    lines = [
        [
            name,
            f"{row['images_per_s']:.1f}",
            f"{row['images_per_s'] / dense['images_per_s']:.2f}x",
            f"{row['model_step_images_per_s']:.1f}",
            f"{row['model_step_images_per_s'] / dense['model_step_images_per_s']:.2f}x",
            f"{row['params']:,}",
            f"{row['flops']:,}",
            f"{dense['flops'] / row['flops']:.2f}x",
        ]
        for name, row in rows.items()
    ]
    setting = "GPU, bf16, channels_last" if gpu else "CPU, float32"
    print(
        f"\nResNet-50 training throughput ({setting}, batch {args.batch_size}, {args.image_size}x{args.image_size}; "
        "recipe: median of its logged windows after the first; model step: one batch on the device)"
    )
    print(table(header, lines))

    output = (
        args.output or ROOT / "benchmarks" / "results" / f"resnet50_throughput{'_quick' if args.quick else ''}.json"
    )
    info["load_average_at_end"] = os.getloadavg()
    save_json({"machine": info, "command": command_line(), "setting": setting, "runs": rows}, output)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.5))
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [row["images_per_s"] for row in rows.values()], 0.4, label="recipe")
    steps = [row["model_step_images_per_s"] for row in rows.values()]
    axis.bar([p + 0.2 for p in positions], steps, 0.4, label="model step")
    axis.set_xticks(list(positions), list(rows))
    axis.set_ylabel("images/s")
    axis.legend()
    axis.set_title(f"ResNet-50 training throughput ({setting})")
    save_figure(figure, output.with_suffix(".png"))
    print(f"saved {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
