"""Offline decomposition, step 1 (the AMCT sample's ``decompose_model.py``): load the pretrained
network (the MNIST ``Net`` or a torchvision model), decompose it, save the decomposition info file and
the decomposed weights. Without rank flags, AMCT's choice (``lowrank.auto_decomposition(model, path)``,
as the AMCT sample); with any of ``--method``, ``--ratio``, ``--energy``, ``--vbmf``, ``--budget``,
``--divisor``, lowrank's rules, which ``--calibration-batches N`` fits to the first N training batches
of ``--data-path`` (MNIST for ``--model mnist``; for a torchvision model, ``train/`` class folders read
with the transforms of the model's default torchvision weights), as an online run does.

    python recipes/decompose_model.py --pretrained-path runs/baseline/baseline.pth \\
        --decompose-info-path runs/offline/decompose_info.json \\
        --decomposed-weights-path runs/offline/decomposed_weights.pth
    python recipes/decompose_model.py --budget 0.3 --calibration-batches 8 --data-path ../shared/data \\
        --pretrained-path runs/baseline/baseline.pth --decompose-info-path runs/offline/decompose_info.json \\
        --decomposed-weights-path runs/offline/decomposed_weights.pth
    python recipes/decompose_model.py --model resnet50 --method tucker2 --ratio 0.5 \\
        --pretrained-path resnet50.pth --decompose-info-path runs/r50_offline/decompose_info.json \\
        --decomposed-weights-path runs/r50_offline/decomposed_weights.pth

Step 2 is ``mnist_offline.py`` (or ``resnet50_imagenet.py --tensor-decompose --run-mode offline``) with
the same two paths; the policy flags (``--method``, ``--ratio``, ``--energy``, ``--vbmf``,
``--budget``, ``--divisor``, ``--calibration-batches``) are step 1's alone. Errors: a missing or
unreadable ``--pretrained-path`` and output paths that cannot be written are named before any work;
nothing is written when the decomposition fails, and an earlier info file stays as it was when the
weights cannot be saved or the job is stopped (SIGTERM or SIGUSR1, as a time limit or ``scancel``
sends) before they are.
"""

import argparse
import signal
import sys
from pathlib import Path

import torch
import torchvision

from launch.args import (
    add_policy_args,
    check_calibration_args,
    check_distinct,
    check_writable,
    policy_of,
    positive_int,
)
from launch.barrier import Artifacts, decompose
from launch.entry import RunError, run_main
from launch.mnist import Net, load_mnist
from launch.model import calibration_reader, torchvision_classifier
from lowrank.io import atomic_write, load_state_dict, load_weights, make_parent_dirs, save_state_dict


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained-path", required=True, help="pretrained weights (required)")
    parser.add_argument(
        "--decompose-info-path", required=True, help="where to save the decomposition info file (required)"
    )
    parser.add_argument(
        "--decomposed-weights-path", required=True, help="where to save the decomposed weights (required)"
    )
    parser.add_argument(
        "--model",
        default="mnist",
        help="'mnist' (the AMCT sample's Net) or a torchvision classification model name (default: mnist)",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=224,
        help="the images a vision transformer (vit_*) is built for, as step 2's --image-size (default: 224)",
    )
    parser.add_argument(
        "--data-path",
        default=None,
        help="with --calibration-batches: the folder holding MNIST/raw/ (--model mnist) or train/ (default: None)",
    )
    parser.add_argument(
        "--train-batch-size",
        type=positive_int,
        default=32,
        help="with --calibration-batches: images per calibration batch, as an online run's per-process "
        "--train-batch-size (default: 32)",
    )
    add_policy_args(parser)
    return parser


def calibration_set(args):
    """The training images that ``--calibration-batches`` reads, with the evaluation transforms."""
    if args.model == "mnist":
        try:
            return load_mnist(args.data_path, train=True)
        except RuntimeError as error:  # it says what is missing or damaged, and what to do
            raise RunError(f"--data-path: {error}") from None
    transform = torchvision.models.get_model_weights(args.model).DEFAULT.transforms()
    folder = Path(args.data_path) / "train"
    try:
        return torchvision.datasets.ImageFolder(folder, transform)
    except FileNotFoundError as error:  # no such folder, or no class folder with images
        raise RunError(f"--data-path {args.data_path}: {folder}: {error}") from None


def main(args):
    models = torchvision.models.list_models(module=torchvision.models)  # the classification ones
    if args.model != "mnist" and args.model not in models:
        raise RunError(
            f"--model {args.model} is neither 'mnist' nor one of torchvision's classifiers: {', '.join(models)}"
        )
    check_calibration_args(args)
    if args.calibration_batches and not args.data_path:
        raise RunError("--calibration-batches reads the training images of --data-path: give it")
    check_distinct(args, "pretrained_path", "decompose_info_path", "decomposed_weights_path")
    check_writable(args, ["decompose_info_path", "decomposed_weights_path"])
    # Their default action would end the process before the restore below (a time limit, scancel).
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    try:
        state_dict = load_state_dict(args.pretrained_path)
        if args.model == "mnist":
            model = Net()
        else:  # as many classes as the pretrained classifier has: the model's last weight, found by its name
            # (a safetensors file sorts its keys) on a copy with no storage (the meta device)
            with torch.device("meta"):
                layout = torchvision.models.get_model(args.model).state_dict()
            classifier = next(name for name in reversed(layout) if name.endswith("weight"))
            pretrained = state_dict.get(classifier)
            classes = pretrained.shape[0] if pretrained is not None else layout[classifier].shape[0]
            model = torchvision_classifier(args.model, classes, args.image_size)
        load_weights(model, state_dict, args.pretrained_path)
    except (FileNotFoundError, ValueError) as error:  # they name the file and what is wrong with it
        raise RunError(f"--pretrained-path (for --model {args.model}): {error}") from None
    policy = policy_of(args, example_input=torch.zeros(1, *input_shape(model, args)))
    read = calibration_reader(
        calibration_set(args) if args.calibration_batches else None, args.calibration_batches, args.train_batch_size
    )
    if read is not None:
        policy["calibration"] = read()
    info_path = Path(args.decompose_info_path)
    make_parent_dirs(info_path)
    # The lock that online runs take on the same paths: two jobs never interleave their two files.
    weights_path = Path(args.decomposed_weights_path)
    with Artifacts(info_path, weights_path).lock(timeout=-1):
        earlier_info = info_path.read_bytes() if info_path.is_file() else None
        earlier_weights = _identity(weights_path)
        try:
            model, _ = decompose(model, info_path, policy)
            save_state_dict(model.state_dict(), weights_path)
        except BaseException:
            # The two files go together: a new info file next to earlier weights would replay wrongly
            # (and once the new weights are in place, so is the pair).
            if _identity(weights_path) != earlier_weights:
                raise
            if earlier_info is None:
                info_path.unlink(missing_ok=True)
            else:
                atomic_write(info_path, lambda file: file.write(earlier_info))
            raise
    print(f"Decomposed weights are saved to: {args.decomposed_weights_path}")


def input_shape(model, args) -> tuple[int, ...]:
    """One image's shape, as step 2 costs the model: MNIST's, or ``--image-size`` RGB."""
    return (1, 28, 28) if args.model == "mnist" else (3, args.image_size, args.image_size)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is (inode, modification time): the atomic save replaces it by another."""
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a parent is a file
        return None
    return stat.st_ino, stat.st_mtime_ns


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
