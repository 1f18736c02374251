"""ResNet-50 (or any torchvision classifier, ``--model NAME``) on ImageNet with optional low-rank
decomposition: msModelSlim's sample flow (decompose on one process, save, every process rebuilds the
structure and loads the weights) on the MNIST recipes' runner: baseline, online and offline modes, SGD
with momentum, cosine schedule with warmup, label smoothing, mixed precision and channels_last on GPUs,
gradient accumulation, top-1/top-5 and images/s.

``--data-path`` holds ``train/`` and ``val/`` class folders (ImageFolder); the number of classes
comes from them. Pretrained weights come from a local state dict (``--pretrained-path``) or, where
there is internet, torchvision's weights by name (``--weights IMAGENET1K_V2``), evaluated with the
transforms those weights define (``--val-resize-size`` and ``--val-crop-size`` override them, as in
torchvision's reference). The process-group
flags are the MNIST recipes' (``--backend``, ``--init-method``, and ``--local-rank``, which
``python -m torch.distributed.launch`` passes).

The decomposition is msModelSlim's sample's, ``Decompose(model).from_ratio(0.5)``, unless a rank flag
(``--method``, ``--ratio``, ``--energy``, ``--vbmf``, ``--divisor``) selects lowrank's rules (tucker2 at
``--ratio 0.5`` of each layer's FLOPs by default). One GPU, online (decompose, then finetune at a tenth
of the learning rate; ``--divisor 8`` rounds lowrank's ranks to multiples of 8, which GPUs' bf16
matrix units take without padding):

    accelerate launch --num_processes 1 recipes/resnet50_imagenet.py --mixed-precision bf16 \\
        --data-path /data/imagenet --weights IMAGENET1K_V2 --tensor-decompose --run-mode online \\
        --divisor 8 --output-dir runs/r50_online

Eight GPUs on one node (NCCL), same flags:

    accelerate launch --config_file recipes/configs/gpu_8proc.yaml recipes/resnet50_imagenet.py ...

Several nodes (run on each node with its --machine_rank; see slurm/resnet50_gpu.sbatch):

    accelerate launch --config_file recipes/configs/multi_node.yaml --machine_rank $NODE_RANK \\
        --main_process_ip $HEAD_ADDR --num_machines $NODES --num_processes $((NODES * 8)) \\
        recipes/resnet50_imagenet.py ...

``--calibration-batches N`` fits the decomposition to the first N training batches, read in order
with the validation transforms (msModelSlim's ``datasets=`` for its default, lowrank's data-aware
rules with a rank flag); ``--budget R`` keeps the model's multiply-adds at most R of the dense
model's, allocating ranks where they cost the least error. ``--distill`` finetunes the decomposed
model against the dense pretrained one (``--pretrained-path`` or ``--weights``) as teacher, online or
offline: ``--distill-alpha`` (default 0.5) weighs the task's loss (cross-entropy with label smoothing)
against the teacher's, at ``--distill-temperature`` (default 4).

DeepSpeed ZeRO-2, in float32 and without channels_last: ``--config_file
recipes/configs/deepspeed_zero2.yaml``. Offline: step 1 is ``python recipes/decompose_model.py --model
resnet50 --method tucker2 --ratio 0.5 --pretrained-path ...`` (lowrank's rules; without rank flags,
AMCT's choice), step 2 this recipe with
``--tensor-decompose --run-mode offline --decompose-info-path ... --decomposed-weights-path ...``. A
smoke test without data: ``--synthetic --image-size 64 --steps 4`` (random images, 10 classes), on the
GPUs where there are any (``--cpu`` keeps the CPU); ``--lr`` is used as given, and the default 0.1
diverges at a global batch of 8:

    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/resnet50_imagenet.py \\
        --synthetic --image-size 64 --train-batch-size 4 --lr 0.001 --steps 4 --workers 0 --output-dir runs/r50_smoke

Errors: as the MNIST recipes (missing paths name their flag before any work; a failure on rank 0
while decomposing stops every rank with its message; SIGTERM/SIGUSR1 checkpoint and exit with 75,
rerun with ``--resume``), plus: no ``train/``/``val/`` under ``--data-path``, a class folder without
images, class folders in ``val/`` that ``train/`` lacks (``val/`` may hold fewer: its labels follow
``train/``'s), a single class; ``--weights`` whose class count differs from the dataset's, or that cannot
be downloaded; a ``--pretrained-path`` that does not fit ``--model`` with the dataset's classes;
``--test-only`` with nothing to evaluate but a random initialisation; ``--distill`` with ``--test-only``
or without ``--tensor-decompose`` or pretrained weights, and ``--distill-alpha``/``--distill-temperature``
without ``--distill``; fp16/bf16 on a device that lacks it (fp16 on the CPU, where Accelerate would
train in float32); fp16/bf16 under DeepSpeed (its casts leave BatchNorm's running statistics in
float32, which torch refuses), named before any work. An image that cannot be read stops the run with
its file name (the checkpoints saved until then resume).
"""

import argparse
import copy
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from accelerate.utils import DistributedType, set_seed
from PIL import Image
from torchvision import datasets, transforms

from launch.accelerator import create_accelerator
from launch.args import (
    add_decomposition_args,
    add_distill_args,
    add_distributed_args,
    add_output_args,
    check_mode_args,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from launch.checkpoints import Progress, checkpoint_to_resume, load_checkpoint
from launch.distill import training_objective
from launch.distributed import rank_zero_first
from launch.entry import RunError, run_main
from launch.loop import ShuffleByEpoch, check_train_batches, end_run, evaluate, finish, train
from launch.model import setup_model, torchvision_classifier
from launch.preemption import leave_signals_to_the_trainer

# ImageNet's channel statistics, as torchvision's weights expect them.
NORMALIZE = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# Images per split of --synthetic (generated on the fly, so size costs nothing): 50 steps of 256
# without an epoch's evaluation in between, for throughput runs; few classes, for smoke tests.
SYNTHETIC = {"train": 12800, "val": 128, "classes": 10}
# Without rank flags, msModelSlim's sample: Decompose(model).from_ratio(0.5). With any, lowrank's rules,
# tucker2 (as msModelSlim's) at half of each layer's FLOPs unless --method or --ratio say otherwise.
POLICY_DEFAULTS = {"seed": "msmodelslim", "method": "tucker2", "ratio": 0.5}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # data
    parser.add_argument(
        "--data-path", default="data/imagenet", help="folder holding train/ and val/ (default: data/imagenet)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="random images instead of --data-path, for smoke tests (default: off)"
    )
    parser.add_argument("--image-size", type=positive_int, default=224, help="training crop size (default: 224)")
    parser.add_argument(
        "--workers", type=non_negative_int, default=8, help="data loading processes per process (default: 8)"
    )
    # training
    parser.add_argument(
        "--train-batch-size", type=positive_int, default=32, help="batch size per process (default: 32)"
    )
    parser.add_argument(
        "--test-batch-size", type=positive_int, default=64, help="test batch size per process (default: 64)"
    )
    parser.add_argument("--epochs", type=positive_int, default=90, help="training epochs (default: 90)")
    parser.add_argument(
        "--steps",
        type=non_negative_int,
        default=None,
        help="cap on optimizer steps; with --epochs it sets the cosine schedule's length, so a --resume "
        "keeps it (default: None, no cap)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="SGD learning rate, used as given whatever the global batch, as in torchvision's reference (0.1 for 8 "
        "processes x 32); scale it with the global batch yourself (default: 0.1, and 0.01 when finetuning a "
        "decomposed model)",
    )
    parser.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="weight decay (default: 1e-4)")
    parser.add_argument("--label-smoothing", type=probability, default=0.1, help="label smoothing (default: 0.1)")
    parser.add_argument(
        "--lr-warmup-epochs",
        type=non_negative_float,
        default=1.0,
        help="linear warmup before the cosine decay (default: 1)",
    )
    parser.add_argument(
        "--gradient-accumulation-steps", type=positive_int, default=1, help="batches per optimizer step (default: 1)"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="autocast precision (default: None, the launcher's setting)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on GPUs, off under DeepSpeed)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU where there are GPUs too (default: off: the GPUs)"
    )
    parser.add_argument(
        "--use-gpu", action="store_true", help="accepted as before: GPUs are used wherever there are any (default: off)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=positive_int, default=20, help="steps between log lines (default: 20)")
    parser.add_argument("--test-only", action="store_true", help="only evaluate the model (default: off)")
    # model and decomposition
    parser.add_argument(
        "--model",
        default="resnet50",
        choices=CLASSIFIERS,
        metavar="NAME",
        help="any of torchvision's classifiers, torchvision.models.list_models(module=torchvision.models) "
        "(default: resnet50)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        type=lambda name: name.rpartition(".")[2],  # torchvision's references spell it ResNet50_Weights.<name>
        help="instead of --pretrained-path: torchvision's weights of --model by name, e.g. IMAGENET1K_V2 or "
        "ResNet50_Weights.IMAGENET1K_V2, evaluated with the transforms they define; needs internet the first "
        "time (default: None)",
    )
    parser.add_argument(
        "--val-resize-size",
        type=positive_int,
        default=None,
        help="validation images are resized to this, then center-cropped (default: --weights' own, else "
        "--image-size x 256/224)",
    )
    parser.add_argument(
        "--val-crop-size",
        type=positive_int,
        default=None,
        help="the validation center crop (default: --weights' own, else --image-size)",
    )
    add_distributed_args(parser)
    add_decomposition_args(parser, **POLICY_DEFAULTS)
    add_output_args(parser, output_dir="runs/resnet50")
    add_distill_args(parser)
    return parser


def load_data(args, weights=None):
    """Train and validation sets with torchvision's standard ImageNet transforms; the validation set's
    are those ``weights`` define (their resize, crop, interpolation and statistics), as torchvision's
    reference evaluates them, unless ``--val-resize-size`` or ``--val-crop-size`` say otherwise."""
    preset = weights.transforms() if weights is not None else None
    normalize = transforms.Normalize(preset.mean, preset.std) if preset else NORMALIZE
    resize = args.val_resize_size or (preset.resize_size[0] if preset else int(args.image_size * 256 / 224))
    crop = args.val_crop_size or (preset.crop_size[0] if preset else args.image_size)
    interpolation = preset.interpolation if preset else transforms.InterpolationMode.BILINEAR
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_transform = transforms.Compose(
        [transforms.Resize(resize, interpolation), transforms.CenterCrop(crop), transforms.ToTensor(), normalize]
    )
    if args.synthetic:
        shape = (3, resize, resize)
        return (
            datasets.FakeData(SYNTHETIC["train"], shape, SYNTHETIC["classes"], train_transform, random_offset=0),
            # Image i is drawn from seed i + random_offset: the validation images follow the training ones.
            datasets.FakeData(
                SYNTHETIC["val"], shape, SYNTHETIC["classes"], val_transform, random_offset=SYNTHETIC["train"]
            ),
        )
    folders = {split: Path(args.data_path) / split for split in ("train", "val")}
    missing = [str(folder) for folder in folders.values() if not folder.is_dir()]
    if missing:
        raise RunError(f"--data-path {args.data_path} has no {' and no '.join(missing)} (ImageFolder layout)")
    splits = {}
    for split, transform in (("train", train_transform), ("val", val_transform)):
        try:
            splits[split] = datasets.ImageFolder(folders[split], transform, loader=load_image)
        except FileNotFoundError as error:  # no class folder, or one without images
            raise RunError(f"--data-path {args.data_path}: {folders[split]}: {error}") from None
    train_set, val_set = splits["train"], splits["val"]
    unknown = sorted(set(val_set.classes) - set(train_set.classes))
    if unknown:
        raise RunError(f"--data-path {args.data_path}: val/ holds class folders that train/ lacks: {_some(unknown)}")
    # Each folder numbers its own classes (sorted names): val/'s labels are given train/'s numbers, which
    # differ where val/ lacks a class.
    number = {val_set.class_to_idx[name]: train_set.class_to_idx[name] for name in val_set.classes}
    val_set.samples = val_set.imgs = [(path, number[label]) for path, label in val_set.samples]
    val_set.targets = [label for _, label in val_set.samples]
    val_set.classes, val_set.class_to_idx = train_set.classes, train_set.class_to_idx
    if len(train_set.classes) < 2:  # the loss would be 0 and the accuracy 100% whatever the model
        raise RunError(f"--data-path {args.data_path} has a single class folder: a classifier needs two or more")
    return train_set, val_set


def _some(names: list) -> str:
    return (", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")) or "none"


def load_image(path: str) -> Image.Image:
    """torchvision's RGB image loader, except that 16-bit grayscale is scaled to 8 bits (the RGB
    conversion would clip it to white) and an unreadable file is named (PIL's truncated-file error
    does not)."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16"):
                image = image.point(lambda value: value / 256)
            return image.convert("RGB")
    except OSError as error:
        raise OSError(f"cannot read image {path}: {error}") from error


def model_weights(model: str, name: str):
    """torchvision's weights ``name`` of ``model`` (an enum member), or a RunError naming the valid ones."""
    enum = torchvision.models.get_model_weights(model)
    if name not in enum.__members__:
        raise RunError(f"--weights {name}: {model}'s weights are {', '.join(enum.__members__)}")
    return enum[name]


def check_weights(name: str, weights, classes) -> None:
    """Raises a RunError when torchvision's ``weights`` (``--weights name``) classify into another number
    of classes than the dataset's."""
    categories = len(weights.meta["categories"])
    if categories != classes:
        raise RunError(
            f"--weights {name} has {categories} classes, the dataset {classes}; "
            "pass a --pretrained-path with a matching classifier"
        )


def pretrained_weights_path(weights) -> str:
    """The local file of torchvision's ``weights`` (downloaded once into torch's hub cache), so that the
    barrier fingerprints it like any ``--pretrained-path``."""
    try:
        weights.get_state_dict(progress=False)
    except OSError as error:  # no internet (urllib's URLError), a full disk
        raise RuntimeError(
            f"cannot download {weights.url}: {error}; without internet, copy the file and pass it as --pretrained-path"
        ) from None
    return str(Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name)


def warmup_cosine(warmup_steps, total_steps):
    """The learning-rate factor at a step: linear warmup, then cosine decay to zero."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def main(args):
    if args.weights and args.pretrained_path:
        raise RunError("--weights and --pretrained-path both give the pretrained weights: pass one")
    if args.cpu and args.use_gpu:
        raise RunError("--cpu and --use-gpu ask for different devices: pass one")
    run = check_mode_args(args, pretrained="weights")
    args.lr = args.lr if args.lr is not None else (0.1 if run.mode == "baseline" else 0.01)
    # The data and the class count of --weights are checked on every rank, before a training run without
    # --resume moves an earlier run's checkpoints aside, and before a rank waits for another that exited.
    weights = model_weights(args.model, args.weights) if args.weights else None
    train_set, val_set = load_data(args, weights)
    classes = SYNTHETIC["classes"] if args.synthetic else len(train_set.classes)
    if weights:
        check_weights(args.weights, weights, classes)
    # The GPUs the launcher gives, as torchvision's reference trains; --use-gpu where torch sees none says so.
    accelerator = create_accelerator(
        use_gpu=args.use_gpu or (not args.cpu and torch.cuda.is_available()),
        output_dir=args.output_dir,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        backend=args.backend,
        init_method=args.init_method,
    )
    # DeepSpeed's fp16/bf16 casts every parameter, BatchNorm's too, but not the BatchNorm running
    # statistics (float32), a mix torch's batch_norm refuses at the first forward pass.
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and accelerator.mixed_precision != "no":
        raise RunError(
            f"mixed precision {accelerator.mixed_precision} (--mixed-precision or the launcher's config) "
            "does not run under DeepSpeed, which casts BatchNorm's weights but not its running statistics: "
            "pass --mixed-precision no, or launch without DeepSpeed (Accelerate's autocast)"
        )
    # DeepSpeed broadcasts the parameters as bytes (a view that needs a unit last stride, which a
    # channels_last 4-D weight lacks) and ZeRO copies them into flat, contiguous buffers.
    if deepspeed and args.channels_last:
        raise RunError(
            "--channels-last does not run under DeepSpeed, which takes contiguous (NCHW) weights: drop "
            "--channels-last, or launch without DeepSpeed"
        )
    gpu = accelerator.device.type == "cuda"
    if args.channels_last is None:
        args.channels_last = gpu and not deepspeed
    # The learning-rate curve depends on these: a scheduler's checkpoint holds its step, not its curve.
    schedule = ("epochs", "steps", "lr_warmup_epochs", "label_smoothing")
    settings = {**vars(args), **run.settings()}
    checkpoint = checkpoint_to_resume(settings, accelerator.num_processes, recipe_settings=schedule)
    if args.test_only and run.mode == "baseline" and not (checkpoint or args.pretrained_path or args.weights):
        raise RunError(
            "--test-only would evaluate a randomly initialised model: give --pretrained-path or --weights, "
            "or --resume with a checkpoint in --output-dir"
        )
    set_seed(args.seed)

    # data
    if not args.test_only:
        check_train_batches(len(train_set), args.train_batch_size, accelerator.num_processes)
    loader = functools.partial(
        torch.utils.data.DataLoader,
        num_workers=args.workers,
        pin_memory=gpu,
        worker_init_fn=leave_signals_to_the_trainer,
    )
    shuffle = ShuffleByEpoch(train_set, seed=args.seed)
    train_loader = loader(train_set, batch_size=args.train_batch_size, sampler=shuffle, drop_last=True)
    val_loader = loader(val_set, batch_size=args.test_batch_size)

    # model
    if args.weights:  # downloaded by rank 0, which the others wait for, then found in the hub cache
        args.pretrained_path = rank_zero_first(lambda: pretrained_weights_path(weights), f"--weights {args.weights}")
    dense = torchvision_classifier(args.model, classes, args.image_size)
    example_input = torch.zeros(1, 3, args.image_size, args.image_size)
    # The training images with the validation transforms calibrate the decomposition.
    calibration_set = copy.copy(train_set)
    calibration_set.transform = val_set.transform
    model, cost = setup_model(accelerator, dense, run, args, example_input, args.model, checkpoint, calibration_set)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A fixed image size: cuDNN's autotuner picks each convolution's fastest algorithm once, as in
    # torchvision's reference (which algorithm wins may differ between runs: not bit-reproducible).
    torch.backends.cudnn.benchmark = gpu

    # criterion: the reference's, or with --distill against the dense pretrained model as teacher
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    task_loss = functools.partial(F.cross_entropy, label_smoothing=args.label_smoothing)
    loss_fn = training_objective(accelerator, task_loss, dense, run, args.pretrained_path, memory_format)

    # optimizer and schedule, in optimizer steps
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # Accelerate steps at the end of every epoch (sync_with_dataloader), so the last step of an epoch
    # may take fewer batches. The accelerator's value: under DeepSpeed, prepare sets it to DeepSpeed's.
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.gradient_accumulation_steps)
    steps = args.epochs * steps_per_epoch if args.steps is None else min(args.steps, args.epochs * steps_per_epoch)
    warmup_steps = min(round(args.lr_warmup_epochs * steps_per_epoch), steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, steps))
    progress = Progress()
    accelerator.register_for_checkpointing(progress, scheduler)
    if checkpoint:
        load_checkpoint(accelerator, checkpoint, progress)

    evaluate_model = functools.partial(
        evaluate, accelerator, model, val_loader, loss_fn=F.cross_entropy, top5=True, tag="eval"
    )
    if args.test_only:
        evaluate_model(step=progress.step)
        end_run(accelerator)
        return
    train(
        accelerator,
        model,
        optimizer,
        train_loader,
        progress,
        steps=steps,
        log_steps=args.log_steps,
        output_dir=args.output_dir,
        settings={**vars(args), **run.settings()},  # with the --weights file
        loss_fn=loss_fn,
        scheduler=scheduler,
        checkpoint_steps=args.checkpoint_steps,
        eval_steps=steps_per_epoch,
        eval_fn=lambda: evaluate_model(step=progress.step),
        throughput_unit="images/s",
    )
    metrics = evaluate_model(step=progress.step)

    # save
    results = {"mode": run.mode, **metrics, **cost}
    finish(accelerator, model, progress, results, output_dir=args.output_dir, save_path=args.save_path)


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
