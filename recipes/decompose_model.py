"""Offline decomposition, step 1 (the AMCT sample's ``decompose_model.py``): load the pretrained
MNIST network, decompose it, save the decomposition info file and the decomposed weights.

    python recipes/decompose_model.py --pretrained-path runs/baseline/baseline.pth \\
        --decompose-info-path runs/offline/decompose_info.json \\
        --decomposed-weights-path runs/offline/decomposed_weights.pth

Step 2 is ``mnist_offline.py`` with the same two paths. Errors: a missing or unreadable
``--pretrained-path`` is named; nothing is written when the decomposition fails.
"""

import argparse

import lowrank
from launch.mnist import Net
from lowrank.io import load_state_dict, save_state_dict
from lowrank.policy import DEFAULT_RATIO


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
        "--method",
        default="spatial",
        choices=("spatial", "tucker2", "svd"),
        help="method for k x k convolutions (default: spatial)",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=DEFAULT_RATIO,
        help=f"fraction of each layer's FLOPs kept (default: {DEFAULT_RATIO})",
    )
    return parser


def main(args):
    model = Net()
    model.load_state_dict(load_state_dict(args.pretrained_path))
    model, _ = lowrank.auto_decomposition(model, args.decompose_info_path, method=args.method, ratio=args.ratio)
    save_state_dict(model.state_dict(), args.decomposed_weights_path)
    print(f"Decomposed weights are saved to: {args.decomposed_weights_path}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
