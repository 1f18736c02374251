"""MNIST online: ``mnist_train.py`` with --tensor-decompose --run-mode online, lr 0.001.

    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_online.py \\
        --data-path ../shared/data --train-batch-size 128 --pretrained-path runs/baseline/baseline.pth \\
        --output-dir runs/online --save-path runs/online/decomposed_finetuned.pth

Also under ``torchrun --nproc_per_node 2`` and plain ``python``; see mnist_train.py for every flag and error.
"""

from mnist_train import get_args_parser, main

from launch.entry import run_main

if __name__ == "__main__":
    run_main(main, get_args_parser(run_mode="online", lr=0.001).parse_args())
