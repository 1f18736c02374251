"""MNIST offline, step 2: ``mnist_train.py`` with --tensor-decompose --run-mode offline, lr 0.001.

Step 1 is ``decompose_model.py``; then every process replays the info file and loads the weights:

    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_offline.py \\
        --data-path ../shared/data --train-batch-size 128 \\
        --decompose-info-path runs/offline/decompose_info.json \\
        --decomposed-weights-path runs/offline/decomposed_weights.pth \\
        --output-dir runs/offline --save-path runs/offline/decomposed_finetuned.pth

Also under ``torchrun --nproc_per_node 2`` and plain ``python``; see mnist_train.py for every flag and error.
"""

from mnist_train import get_args_parser, main

from launch.entry import run_main

if __name__ == "__main__":
    run_main(main, get_args_parser(run_mode="offline", lr=0.001).parse_args())
