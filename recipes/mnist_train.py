"""MNIST training and finetuning with optional low-rank decomposition: the AMCT sample's
``simple_train.py``/``ddp_train.py`` with the same flags and log lines, on one process or many.

Train the baseline, then finetune a decomposed copy online (rank 0 decomposes, the others load):

    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_train.py \\
        --data-path ../shared/data --train-batch-size 128 --save-path runs/baseline/baseline.pth
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_train.py \\
        --data-path ../shared/data --train-batch-size 128 --lr 0.001 --pretrained-path runs/baseline/baseline.pth \\
        --tensor-decompose --run-mode online --output-dir runs/online --save-path runs/online/decomposed_finetuned.pth

The same runs under ``torchrun --nproc_per_node 2 recipes/mnist_train.py ...`` and plain
``python recipes/mnist_train.py ...``. ``mnist_baseline.py``, ``mnist_online.py`` and
``mnist_offline.py`` are this script with their mode implied.

Errors: a missing path for the chosen mode names its flag before any work; no MNIST under
``--data-path`` and no internet fails within a minute; a failure on rank 0 while decomposing stops
every rank with rank 0's message; on SIGTERM/SIGUSR1 a checkpoint is saved and the process exits
with code 75 (rerun with ``--resume``).
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

import lowrank
from launch.barrier import global_rank
from launch.mnist import Net, load_mnist
from launch.runner import (
    Progress,
    evaluate,
    latest_checkpoint,
    log,
    log_decomposition,
    prepare_model,
    save_checkpoint,
    train,
)
from lowrank.io import atomic_write, save_state_dict
from lowrank.policy import DEFAULT_RATIO


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
        type=int,
        default=None,
        help="batch size per process (default: 256 on one process, 32 per process otherwise)",
    )
    parser.add_argument("--test-batch-size", type=int, default=1000, help="test batch size per process (default: 1000)")
    parser.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default: {lr})")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    parser.add_argument("--use-gpu", action="store_true", help="train on GPUs; CPU without it (default: off)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=int, default=20, help="steps between log lines (default: 20)")
    parser.add_argument(
        "--save-path", default=None, help="where to save the trained weights (default: None, not saved)"
    )
    # decomposition
    parser.add_argument(
        "--pretrained-path", default=None, help="pretrained weights; required in online mode (default: None)"
    )
    parser.add_argument(
        "--tensor-decompose",
        action="store_true",
        default=run_mode is not None,
        help=f"decompose the model (default: {run_mode is not None})",
    )
    parser.add_argument(
        "--decompose-info-path",
        default=None,
        help="decomposition info file: written online, read offline (default: <output-dir>/decompose_info.json online)",
    )
    parser.add_argument(
        "--decomposed-weights-path",
        default=None,
        help="decomposed weights: written online, read offline (default: <output-dir>/decomposed_weights.pth online)",
    )
    parser.add_argument(
        "--run-mode",
        choices=("online", "offline"),
        default=run_mode or "online",
        help=f"decomposition mode (default: {run_mode or 'online'})",
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
    parser.add_argument(
        "--barrier-timeout",
        type=float,
        default=3600,
        help="seconds the other ranks wait for rank 0's decomposition (default: 3600)",
    )
    # outputs
    parser.add_argument(
        "--output-dir", default="runs/mnist", help="TensorBoard logs and checkpoints (default: runs/mnist)"
    )
    parser.add_argument(
        "--checkpoint-steps",
        type=int,
        default=0,
        help="steps between checkpoints, 0: only at the end and on preemption (default: 0)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir (default: off)"
    )
    return parser


def check_args(args):
    """Missing paths for the chosen mode, named by their flag, before any work."""
    mode = args.run_mode if args.tensor_decompose else "baseline"
    if mode == "online" and not args.pretrained_path:
        sys.exit("error: --pretrained-path is required in online mode")
    if mode == "offline":
        for flag in ("decompose_info_path", "decomposed_weights_path"):
            if not getattr(args, flag):
                sys.exit(f"error: --{flag.replace('_', '-')} is required in offline mode")
    for flag in ("pretrained_path", "decompose_info_path", "decomposed_weights_path"):
        path = getattr(args, flag)
        if path and (mode == "offline" or flag == "pretrained_path") and not Path(path).is_file():
            sys.exit(f"error: --{flag.replace('_', '-')} {path} does not exist")
    if mode == "online":
        args.decompose_info_path = args.decompose_info_path or str(Path(args.output_dir) / "decompose_info.json")
        args.decomposed_weights_path = args.decomposed_weights_path or str(
            Path(args.output_dir) / "decomposed_weights.pth"
        )
    return mode


def main(args):
    mode = check_args(args)
    accelerator = Accelerator(
        cpu=not args.use_gpu,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.output_dir),
    )
    set_seed(args.seed)
    accelerator.init_trackers(f"mnist_{mode}", config={k: v for k, v in vars(args).items() if v is not None})

    # data
    if args.train_batch_size is None:
        args.train_batch_size = 256 if accelerator.num_processes == 1 else 32
    with accelerator.main_process_first():
        train_set, test_set = load_mnist(args.data_path, train=True), load_mnist(args.data_path, train=False)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.train_batch_size, shuffle=True, drop_last=True
    )
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size)

    # model
    dense = Net()
    model, changes, seconds, reused = prepare_model(
        copy.deepcopy(dense),
        mode,
        pretrained_path=args.pretrained_path,
        info_path=args.decompose_info_path,
        weights_path=args.decomposed_weights_path,
        policy={"method": args.method, "ratio": args.ratio},
        timeout=args.barrier_timeout,
    )
    if mode != "baseline":
        log_decomposition(
            accelerator, dense, model, changes, seconds, torch.randn(1, 1, 28, 28), args.decompose_info_path
        )

    # training
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume and latest_checkpoint(args.output_dir):
        accelerator.load_state(latest_checkpoint(args.output_dir))
        log(f"[Resume] from {latest_checkpoint(args.output_dir)} at step {progress.step}")
    train(
        accelerator,
        model,
        optimizer,
        train_loader,
        progress,
        steps=args.steps,
        log_steps=args.log_steps,
        output_dir=args.output_dir,
        args=args,
        checkpoint_steps=args.checkpoint_steps,
    )
    loss, correct, total = evaluate(accelerator, model, test_loader, step=progress.step)

    # save
    save_checkpoint(accelerator, args.output_dir, progress, args)
    if global_rank() == 0:
        trained = accelerator.unwrap_model(model)
        results = {
            "mode": mode,
            "steps": progress.step,
            "test_loss": loss,
            "accuracy": correct / total,
            "correct": correct,
            "total": total,
            "params": lowrank.count_parameters(trained),
            "flops": lowrank.count_flops(trained, torch.randn(1, 1, 28, 28, device=accelerator.device)),
        }
        atomic_write(
            Path(args.output_dir) / "results.json", lambda file: json.dump(results, file, indent=2), binary=False
        )
        if args.save_path:
            save_state_dict(trained.state_dict(), args.save_path)
            log(f"Weights saved to {args.save_path}")
    accelerator.end_training()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
