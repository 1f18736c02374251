"""Compression quality at a given cost: accuracy against the model's FLOPs for lowrank's weight-only
uniform ratio, its data-aware decomposition, the data-aware model-level budget, and the budget with
distillation while finetuning, on the AMCT sample's MNIST network and on a deeper MNIST CNN with batch
norm; and what calibration costs in time.

Run from the repository root (about 30 minutes on 2 idle CPU cores):

    .venv/bin/python benchmarks/quality.py --data-path ../shared/data
    .venv/bin/python benchmarks/quality.py --data-path ../shared/data --quick   # smoke test

For each network: the dense baseline is trained once (saved in ``--output-dir``; ``--reuse`` takes it
again), and 8 training batches, read in order, are the calibration data. Then, at each model FLOPs
ratio of ``--ratios`` (multiply-adds of one 1x28x28 image, decomposed over dense), with the spatial
method and lowrank's default ``min_rank=8`` (lower for every variant where a uniform ratio cannot reach
the target with it):

1. ``uniform``: ``ratio=r``, every layer cut to the same fraction of its FLOPs, from its weights, with
   the largest ``r`` whose model stays within the FLOPs ratio;
2. ``data-aware``: the same ranks, fitted to the calibration data (``calibration=``);
3. ``budget``: ``budget=<FLOPs ratio>`` with the calibration data, ranks allocated across the layers;
4. ``budget+sequential``: 3's ranks, the layers fitted one after another (``sequential=True``), each
   correcting the error of those before it;
5. ``budget+distill``: 3, finetuned against the dense model (``launch.distill``, alpha 0.5, T 4).

Each is tested before finetuning and after ``--steps`` steps of Adam (lr 0.001, batch 64, the same
batches for all). For 1 to 4, each decomposed layer's relative output error is measured on 512
test images (not calibration data), fed the dense model's inputs. Then the time calibration adds to
a decomposition: on the MNIST network (8 batches of 128) and on ResNet-50 with random weights (8
batches of ``--resnet-batch`` 224x224 images), next to the forward passes over the same batches.

Prints tables and the targets, saves JSON (``benchmarks/results/quality.json``) and a plot of accuracy
against the FLOPs ratio (``benchmarks/results/quality.png``).
"""

import argparse
import copy
import itertools
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from common import (
    add_data_path_argument,
    add_output_argument,
    command_line,
    machine_info,
    machine_line,
    output_path,
    publish,
    pyplot,
    save_figure,
    table,
    verdict,
)
from torch import nn

import lowrank
from launch.distill import distillation_loss
from launch.mnist import Net, load_mnist
from lowrank.io import load_state_dict, save_state_dict

EXAMPLE = torch.zeros(1, 1, 28, 28)
CALIBRATION_BATCHES, CALIBRATION_BATCH = 8, 128
FINETUNE_BATCH, FINETUNE_LR = 64, 0.001
HELD_OUT = 512  # test images for the per-layer output errors (not calibration data)
VARIANTS = ("uniform", "data-aware", "budget", "budget+sequential", "budget+distill")
MIN_RANKS = (8, 4, 2, 1)  # lowrank's default first
SEED = 0


class DeepNet(nn.Module):
    """A deeper MNIST CNN: five 3x3 convolutions with batch norm (32, 64, 128, 128, 256 channels, two
    2x2 max pools), global average pooling and a linear classifier; log-probabilities out, as ``Net``."""

    def __init__(self):
        super().__init__()
        widths, layers = [1, 32, 64, 128, 128, 256], []
        for index, (inputs, outputs) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]
            if index in (1, 3):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(self.features(x).mean((2, 3))), dim=1)


# Each network's baseline training: the AMCT sample's for Net (Adam, lr 0.01, batch 256); about two
# epochs for DeepNet, whose teacher must know more than its students learn in finetuning.
NETWORKS = {
    "Net": {"build": Net, "steps": 200, "batch": 256, "lr": 0.01},
    "DeepNet": {"build": DeepNet, "steps": 1000, "batch": 128, "lr": 0.001},
}


def batches_forever(dataset, batch_size, seed):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
        )


def train(model, dataset, steps, batch_size, lr, teacher=None):
    """``steps`` of Adam on nll_loss (with ``teacher``: distillation at alpha 0.5, T 4)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for data, target in itertools.islice(batches_forever(dataset, batch_size, SEED), steps):
        output = model(data)
        loss = F.nll_loss(output, target)
        if teacher is not None:
            with torch.no_grad():
                taught = teacher(data)
            loss, _ = distillation_loss(output, taught, loss, alpha=0.5, temperature=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def accuracy(model, dataset) -> float:
    model.eval()
    correct = 0
    for data, target in torch.utils.data.DataLoader(dataset, batch_size=1000):
        correct += (model(data).argmax(1) == target).sum().item()
    return correct / len(dataset)


def flops_ratio(model, dense_flops) -> float:
    return lowrank.count_flops(model, EXAMPLE) / dense_flops


def decompose(model, **options):
    """The spatial decomposition of a copy of ``model``."""
    return lowrank.auto_decomposition(copy.deepcopy(model), method="spatial", **options)


def uniform_ratio(model, target, dense_flops, step=0.02) -> tuple[float, int]:
    """The largest per-layer ratio (to 1e-3) whose decomposed model stays within ``target`` of the FLOPs,
    and the min_rank it needs: the default 8, or less where no ratio reaches the target with it (a
    layer whose rank would fall below min_rank stays dense: DeepNet's 32-channel conv below 0.125).
    Not a bisection over (0, 1], since the FLOPs rise again where a layer stays dense: a scan from 1
    down, in ``step``s, finds the first ratio that fits, and a bisection refines it within the step above."""

    def fits(ratio, min_rank):
        return flops_ratio(decompose(model, ratio=ratio, min_rank=min_rank)[0], dense_flops) <= target

    for min_rank in MIN_RANKS:
        low = next((1 - step * i for i in range(int(1 / step)) if fits(1 - step * i, min_rank)), None)
        if low is not None:
            break
    else:
        raise SystemExit(f"no uniform ratio reaches a FLOPs ratio of {target}")
    high = low + step
    while high - low > 1e-3:
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle, min_rank) else (low, middle)
    return low, min_rank


@torch.no_grad()
def layer_errors(dense, decomposed, changes, images) -> dict[str, float]:
    """Each replaced layer's relative output error on the inputs the dense model gives it."""
    inputs = {}
    handles = [
        dense.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs.__setitem__(name, args[0])
        )
        for name in changes
    ]
    dense.eval()
    dense(images)
    for handle in handles:
        handle.remove()
    errors = {}
    for name in changes:
        expected = dense.get_submodule(name)(inputs[name])
        got = decomposed.get_submodule(name)(inputs[name])
        errors[name] = ((got - expected).norm() / expected.norm()).item()
    return errors


def ranks_of(model, changes) -> dict[str, int]:
    """The rank of each replaced layer: its first module's outputs."""
    firsts = {name: model.get_submodule(name)[0] for name in changes}
    return {name: getattr(first, "out_channels", None) or first.out_features for name, first in firsts.items()}


def baseline(name, settings, train_set, out: Path, reuse: bool, steps: int):
    path = out / f"{name}_baseline.pth"
    torch.manual_seed(SEED)
    model = settings["build"]()
    if reuse and path.is_file():
        model.load_state_dict(load_state_dict(path))
        return model.eval()
    train(model, train_set, steps, settings["batch"], settings["lr"])
    save_state_dict(model.state_dict(), path)
    return model.eval()


def evaluate_network(name, settings, data, args, out):
    train_set, test_set = data
    dense = baseline(name, settings, train_set, out, args.reuse, args.baseline_steps or settings["steps"])
    dense_flops = lowrank.count_flops(dense, EXAMPLE)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.calibration_batch_size)
    calibration = [images for images, _ in itertools.islice(loader, args.calibration_batches)]
    held_out = next(iter(torch.utils.data.DataLoader(test_set, batch_size=args.held_out)))[0]
    result = {"dense_accuracy": accuracy(dense, test_set), "dense_flops": dense_flops, "rows": []}
    print(f"{name}: dense accuracy {100 * result['dense_accuracy']:.2f}%, {dense_flops:,} FLOPs", flush=True)
    for target in args.ratios:
        ratio, min_rank = uniform_ratio(dense, target, dense_flops, step=0.1 if args.quick else 0.02)
        built = {
            "uniform": decompose(dense, ratio=ratio, min_rank=min_rank),
            "data-aware": decompose(dense, ratio=ratio, min_rank=min_rank, calibration=calibration),
        }
        for variant, sequential in (("budget", False), ("budget+sequential", True)):
            built[variant] = decompose(
                dense,
                budget=target,
                min_rank=min_rank,
                example_input=EXAMPLE,
                calibration=calibration,
                sequential=sequential,
            )
        built["budget+distill"] = (copy.deepcopy(built["budget"][0]), built["budget"][1])
        for variant in VARIANTS:
            model, changes = built[variant]
            row = {
                "network": name,
                "target": target,
                "variant": variant,
                "uniform_ratio": ratio if variant in ("uniform", "data-aware") else None,
                "min_rank": min_rank,
                "flops_ratio": flops_ratio(model, dense_flops),
                "params": lowrank.count_parameters(model),
                "ranks": ranks_of(model, changes),
                "accuracy_before": accuracy(model, test_set),
            }
            if variant != "budget+distill":
                row["layer_errors"] = layer_errors(dense, model, changes, held_out)
            teacher = dense if variant == "budget+distill" else None
            row["accuracy_finetuned"] = accuracy(
                train(model, train_set, args.steps, FINETUNE_BATCH, FINETUNE_LR, teacher), test_set
            )
            result["rows"].append(row)
            print(
                f"  {target:<5} {variant:<15} FLOPs {row['flops_ratio']:.3f}  before {percent(row['accuracy_before'])}"
                f"  finetuned {percent(row['accuracy_finetuned'])}  ranks {row['ranks']}",
                flush=True,
            )
    return result


def seconds(function, repeats=1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def forward_seconds(model, batches) -> float:
    model.eval()
    return seconds(lambda: [model(batch) for batch in batches])


def calibration_cost(model, batches, options, repeats) -> dict:
    """Decomposition time without and with ``batches`` as calibration, and the forward passes alone."""
    lowrank.set_logger_level("warning")
    try:
        without = seconds(lambda: decompose(model, **options), repeats)
        with_data = seconds(lambda: decompose(model, calibration=batches, **options), repeats)
    finally:
        lowrank.set_logger_level("info")
    forward = forward_seconds(model, batches)
    return {
        "without_s": without,
        "with_s": with_data,
        "forward_s": forward,
        "added_fraction": (with_data - without) / without,
        "statistics_fraction": (with_data - without - forward) / without,
    }


def timing(args, mnist_dense, calibration):
    torch.manual_seed(SEED)
    size = 32 if args.quick else 224
    name = "resnet18" if args.quick else "resnet50"
    resnet = torchvision.models.get_model(name).eval()
    resnet_batches = [torch.randn(args.resnet_batch, 3, size, size) for _ in range(args.calibration_batches)]
    return {
        "mnist": calibration_cost(mnist_dense, calibration, {"ratio": 0.3}, repeats=1 if args.quick else 3),
        "resnet": {"model": name, "image_size": size, "batch": args.resnet_batch}
        | calibration_cost(resnet, resnet_batches, {"ratio": 0.3}, repeats=1),
    }


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def targets(results) -> list[tuple[str, bool, str]]:
    """The issue's targets, each with whether it is met and the figures that decide."""
    checks = []
    for name, network in results["networks"].items():
        rows = {(row["target"], row["variant"]): row for row in network["rows"]}
        ratios = sorted({row["target"] for row in network["rows"]}, reverse=True)
        smallest = ratios[-2:]
        dense = network["dense_accuracy"]
        for target in ratios:
            uniform, budget, distill = (rows[target, variant] for variant in ("uniform", "budget", "budget+distill"))
            for variant in ("budget", "budget+sequential"):
                before = rows[target, variant]["accuracy_before"]
                detail = f"{percent(before)} vs {percent(uniform['accuracy_before'])}"
                ok = before >= uniform["accuracy_before"]
                checks.append((f"{name} {target}: before finetuning, {variant} >= uniform", ok, detail))
                if target in smallest:
                    lost = dense - uniform["accuracy_before"]
                    recovered = before - uniform["accuracy_before"]
                    detail = f"recovers {100 * recovered:.2f} of the {100 * lost:.2f} points uniform loses"
                    checks.append(
                        (f"{name} {target}: {variant} recovers half of uniform's loss", recovered >= lost / 2, detail)
                    )
            for variant in ("budget", "budget+sequential", "budget+distill"):
                ok = rows[target, variant]["accuracy_finetuned"] >= uniform["accuracy_finetuned"]
                finetuned = rows[target, variant]["accuracy_finetuned"]
                detail = f"{percent(finetuned)} vs {percent(uniform['accuracy_finetuned'])}"
                checks.append((f"{name} {target}: finetuned, {variant} >= uniform", ok, detail))
            if target in smallest:
                ok = distill["accuracy_finetuned"] >= budget["accuracy_finetuned"]
                detail = f"{100 * distill['accuracy_finetuned']:.2f}% vs {100 * budget['accuracy_finetuned']:.2f}%"
                checks.append((f"{name} {target}: finetuned, budget+distill >= budget", ok, detail))
            data_aware = rows[target, "data-aware"]["layer_errors"]
            worst = max(data_aware[layer] / uniform["layer_errors"][layer] for layer in data_aware)
            detail = f"largest data-aware / weight-only error {worst:.3f}"
            checks.append((f"{name} {target}: per layer, data-aware error <= weight-only", worst <= 1, detail))
    cost = results["timing"]
    mnist_added = cost["mnist"]["with_s"] - cost["mnist"]["without_s"]
    checks.append(("MNIST: 8 calibration batches add a few seconds at most", mnist_added <= 3, f"{mnist_added:.2f} s"))
    resnet = cost["resnet"]
    detail = (
        f"{100 * resnet['added_fraction']:.0f}% ({resnet['without_s']:.1f} s -> {resnet['with_s']:.1f} s; the forward "
        f"passes alone take {resnet['forward_s']:.1f} s)"
    )
    checks.append((f"{resnet['model']}: calibration adds at most 10%", resnet["added_fraction"] <= 0.1, detail))
    return checks


def report(results) -> str:
    lines = [machine_line(results["machine"])]
    for name, network in results["networks"].items():
        lines += [
            "",
            f"{name}: dense {100 * network['dense_accuracy']:.2f}%, {network['dense_flops']:,} FLOPs per image",
        ]
        rows = [
            [
                row["target"],
                row["variant"],
                f"{row['flops_ratio']:.3f}",
                f"{100 * row['accuracy_before']:.2f}%",
                f"{100 * row['accuracy_finetuned']:.2f}%",
                " ".join(f"{layer} {error:.3f}" for layer, error in row.get("layer_errors", {}).items()) or "-",
            ]
            for row in network["rows"]
        ]
        lines.append(table(["target", "variant", "FLOPs", "before", "finetuned", "output error per layer"], rows))
    cost = results["timing"]
    lines += ["", "Calibration cost (best of runs; seconds):"]
    lines.append(
        table(
            ["model", "without", "with", "forward alone", "added"],
            [
                [
                    key if key == "mnist" else cost[key]["model"],
                    *(f"{cost[key][field]:.2f}" for field in ("without_s", "with_s", "forward_s")),
                    f"{100 * cost[key]['added_fraction']:.0f}%",
                ]
                for key in ("mnist", "resnet")
            ],
        )
    )
    lines += ["", "Targets:"] + [f"  {verdict(ok)}  {what}: {detail}" for what, ok, detail in targets(results)]
    return "\n".join(lines)


def plot(results, path):
    plt = pyplot()
    networks = results["networks"]
    figure, axes = plt.subplots(1, len(networks), figsize=(6 * len(networks), 4.5), squeeze=False)
    colours = dict(zip(VARIANTS, ("tab:grey", "tab:blue", "tab:orange", "tab:red", "tab:green")))
    for axis, (name, network) in zip(axes[0], networks.items()):
        for variant in VARIANTS:
            rows = [row for row in network["rows"] if row["variant"] == variant]
            x = [row["flops_ratio"] for row in rows]
            axis.plot(
                x,
                [100 * row["accuracy_finetuned"] for row in rows],
                "o-",
                color=colours[variant],
                label=f"{variant}, finetuned",
            )
            if variant != "budget+distill":  # the same model as budget before finetuning
                axis.plot(
                    x,
                    [100 * row["accuracy_before"] for row in rows],
                    "x--",
                    color=colours[variant],
                    label=f"{variant}, before",
                )
        axis.axhline(100 * network["dense_accuracy"], color="black", linestyle=":", label="dense")
        axis.set_xscale("log")
        axis.set_xlabel("FLOPs ratio (decomposed / dense)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"MNIST, {name}")
        axis.legend(fontsize=6)
    save_figure(figure, path)


def main(args):
    if args.quick:
        args.ratios, args.steps, args.baseline_steps, args.calibration_batches = [0.15], 2, 4, 2
        args.calibration_batch_size = 32
        args.test_images, args.held_out, args.resnet_batch, args.networks = 64, 16, 2, ["DeepNet"]
    torch.manual_seed(SEED)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    output = output_path(args, "quality")
    test_set = load_mnist(args.data_path, train=False)
    if args.test_images:
        test_set = torch.utils.data.Subset(test_set, range(min(args.test_images, len(test_set))))
    data = (load_mnist(args.data_path, train=True), test_set)
    results = {"command": command_line(), "machine": machine_info(), "args": vars(args), "networks": {}}
    lowrank.set_logger_level("warning")
    for name in args.networks:
        results["networks"][name] = evaluate_network(name, NETWORKS[name], data, args, out)
    lowrank.set_logger_level("info")
    net = baseline("Net", NETWORKS["Net"], data[0], out, True, args.baseline_steps or NETWORKS["Net"]["steps"])
    loader = torch.utils.data.DataLoader(data[0], batch_size=args.calibration_batch_size)
    calibration = [images for images, _ in itertools.islice(loader, args.calibration_batches)]
    results["timing"] = timing(args, net, calibration)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    publish(results, output, report, plot)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_path_argument(parser)
    add_output_argument(parser, "quality")
    parser.add_argument("--output-dir", default="runs/quality", help="the baselines' weights (default: runs/quality)")
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=[0.5, 0.3, 0.15, 0.08],
        help="model FLOPs ratios (default: 0.5 0.3 0.15 0.08)",
    )
    parser.add_argument("--steps", type=int, default=100, help="finetuning steps of every variant (default: 100)")
    parser.add_argument(
        "--baseline-steps",
        type=int,
        default=None,
        help="baseline training steps (default: 200 for Net, 1000 for DeepNet)",
    )
    parser.add_argument(
        "--calibration-batches",
        type=int,
        default=CALIBRATION_BATCHES,
        help=f"calibration batches of --calibration-batch-size (default: {CALIBRATION_BATCHES})",
    )
    parser.add_argument(
        "--calibration-batch-size",
        type=int,
        default=CALIBRATION_BATCH,
        help=f"images per calibration batch (default: {CALIBRATION_BATCH})",
    )
    parser.add_argument(
        "--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS), help="(default: Net DeepNet)"
    )
    parser.add_argument(
        "--resnet-batch", type=int, default=8, help="images per ResNet-50 calibration batch (default: 8)"
    )
    parser.add_argument("--test-images", type=int, default=None, help="test on the first N test images (default: all)")
    parser.add_argument(
        "--held-out", type=int, default=HELD_OUT, help=f"test images for the per-layer errors (default: {HELD_OUT})"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse the baselines saved in --output-dir (default: off)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="DeepNet at ratio 0.15, 2 steps, 2 calibration batches of 32, 64 test images, ResNet-18 on 32x32, "
        "a coarser scan for the uniform ratio: a smoke test",
    )
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
