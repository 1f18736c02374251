"""MNIST training and finetuning with optional low-rank decomposition: the AMCT sample's
``simple_train.py``/``ddp_train.py`` with the same flags and log lines, on one process or many.

Train the baseline, then finetune a decomposed copy online (rank 0 decomposes, the others load):

    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_train.py \\
        --data-path ../shared/data --train-batch-size 128 --output-dir runs/baseline \\
        --save-path runs/baseline/baseline.pth
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_train.py \\
        --data-path ../shared/data --train-batch-size 128 --lr 0.001 --pretrained-path runs/baseline/baseline.pth \\
        --tensor-decompose --run-mode online --output-dir runs/online --save-path runs/online/decomposed_finetuned.pth

The same runs under ``torchrun --nproc_per_node 2 recipes/mnist_train.py ...``, plain
``python recipes/mnist_train.py ...`` and the AMCT sample's own launcher (deprecated by torch, which
warns), with its process-group flags ``--backend gloo|nccl`` (nccl with ``--use-gpu``),
``--init-method``/``--init_method`` (default env://) and ``--local-rank``/``--local_rank`` (passed by
that launcher and accepted; the launcher's LOCAL_RANK environment variable picks the GPU):

    python -m torch.distributed.launch --nproc_per_node=2 recipes/mnist_train.py --backend gloo \\
        --data-path ../shared/data --train-batch-size 128 --output-dir runs/baseline \\
        --save-path runs/baseline/baseline.pth

``mnist_baseline.py``, ``mnist_online.py`` and ``mnist_offline.py`` are this script with their mode
implied. The decomposition is AMCT's choice, as in the sample (``conv2`` at rank 64), unless a rank
flag (``--method``, ``--ratio``, ``--energy``, ``--vbmf``, ``--budget``, ``--divisor``) selects lowrank's
rules; with one, ``--calibration-batches N`` fits them to the first N training batches (data-aware), and
``--budget R`` keeps the model's multiply-adds at most R of the dense model's, ranks allocated where they
cost the least error.
``--distill`` (online or offline, with ``--pretrained-path``) finetunes the decomposed model against
the dense pretrained one as teacher: ``--distill-alpha`` (default 0.5) weighs the task's loss against
the teacher's, at ``--distill-temperature`` (default 4).

Errors: a missing path for the chosen mode names its flag before any work, and so does ``--backend
nccl`` without ``--use-gpu`` or without GPUs, ``--distill`` without ``--tensor-decompose`` or
``--pretrained-path``, and a flag the mode would ignore (the rank rule,
``--method``/``--ratio``/``--energy``/``--vbmf``/``--divisor``, outside online mode; ``--pretrained-path``
offline without ``--distill``; ``--distill-alpha``/``--distill-temperature`` without ``--distill``); no
MNIST under ``--data-path`` and no internet fails within a minute; a failure on rank 0 while
decomposing stops every rank with rank 0's message; on SIGTERM/SIGUSR1 a checkpoint is saved and the
process exits with code 75 (rerun with ``--resume``).
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from launch.accelerator import create_accelerator
from launch.args import (
    add_decomposition_args,
    add_distill_args,
    add_distributed_args,
    add_output_args,
    check_mode_args,
    non_negative_int,
    positive_float,
    positive_int,
)
from launch.checkpoints import Progress, checkpoint_to_resume, load_checkpoint
from launch.distill import training_objective
from launch.distributed import from_rank_zero, rank_zero_first
from launch.entry import run_main
from launch.loop import ShuffleByEpoch, check_train_batches, evaluate, finish, shuffling_seed, train
from launch.mnist import Net, load_mnist
from launch.model import setup_model


def get_args_parser(run_mode=None, lr=0.01):
    """The AMCT sample's flags; ``run_mode`` set by the variants implies ``--tensor-decompose``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # data and training
    parser.add_argument(
        "--data-path", default="data", help="folder holding MNIST/raw/ (plain or .gz files) (default: data)"
    )
    parser.add_argument(
        "--train-batch-size",
        type=positive_int,
        default=None,
        help="batch size per process (default: 256 on one process, 32 per process otherwise)",
    )
    parser.add_argument(
        "--test-batch-size", type=positive_int, default=1000, help="test batch size per process (default: 1000)"
    )
    parser.add_argument("--lr", type=positive_float, default=lr, help=f"Adam learning rate (default: {lr})")
    parser.add_argument("--steps", type=non_negative_int, default=200, help="training steps (default: 200)")
    parser.add_argument("--use-gpu", action="store_true", help="train on GPUs; CPU without it (default: off)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=positive_int, default=20, help="steps between log lines (default: 20)")
    add_distributed_args(parser)
    add_decomposition_args(parser, run_mode)
    add_output_args(parser, output_dir="runs/mnist")
    add_distill_args(parser)
    return parser


def main(args):
    run = check_mode_args(args)
    accelerator = create_accelerator(
        use_gpu=args.use_gpu, output_dir=args.output_dir, backend=args.backend, init_method=args.init_method
    )
    if args.train_batch_size is None:
        args.train_batch_size = 256 if accelerator.num_processes == 1 else 32
    settings = {**vars(args), **run.settings()}  # what a checkpoint records and compares
    checkpoint = checkpoint_to_resume(settings, accelerator.num_processes)
    set_seed(args.seed)

    # data
    train_set, test_set = rank_zero_first(
        lambda: (load_mnist(args.data_path, train=True), load_mnist(args.data_path, train=False)),
        f"--data-path {args.data_path}",
    )
    check_train_batches(len(train_set), args.train_batch_size, accelerator.num_processes)

    # model
    dense = Net()
    # The training images calibrate the decomposition: their transform is the test set's (ToTensor).
    example_input = torch.zeros(1, 1, 28, 28)
    model, cost = setup_model(accelerator, dense, run, args, example_input, "mnist", checkpoint, train_set)

    # The AMCT sample's sampler seeds itself from the global RNG at its first batch, after the model's
    # initialisation. The same seed, drawn here (rank 0's, on every process), gives its batches, the
    # same on one process as on several.
    seed = from_rank_zero(shuffling_seed())
    shuffle = ShuffleByEpoch(train_set, seed=seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.train_batch_size, sampler=shuffle, drop_last=True
    )
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size)

    # criterion: the sample's, or with --distill against the dense pretrained model as teacher
    loss_fn = training_objective(accelerator, F.nll_loss, dense, run, args.pretrained_path)

    # training
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if checkpoint:
        load_checkpoint(accelerator, checkpoint, progress)
    train(
        accelerator,
        model,
        optimizer,
        train_loader,
        progress,
        steps=args.steps,
        log_steps=args.log_steps,
        output_dir=args.output_dir,
        settings=settings,
        loss_fn=loss_fn,
        checkpoint_steps=args.checkpoint_steps,
    )
    metrics = evaluate(accelerator, model, test_loader, step=progress.step)

    # save
    results = {"mode": run.mode, **metrics, **cost}
    finish(accelerator, model, progress, results, output_dir=args.output_dir, save_path=args.save_path)


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
