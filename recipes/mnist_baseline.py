"""MNIST baseline: ``mnist_train.py`` with no decomposition.

    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_baseline.py \\
        --data-path ../shared/data --train-batch-size 128 --output-dir runs/baseline \\
        --save-path runs/baseline/baseline.pth

Also under ``torchrun --nproc_per_node 2`` and plain ``python``; see mnist_train.py for every flag and error.
"""

from mnist_train import get_args_parser, main

from launch.entry import run_main

if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
