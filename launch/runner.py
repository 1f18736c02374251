"""Training and evaluation for the recipes, through Accelerate.

- ``prepare_model``: the model of each mode: ``baseline`` (dense, optionally loaded), ``online``
  (rank 0 decomposes behind the barrier, the others load its artifacts), ``offline`` (every rank
  replays the info file and loads the decomposed weights).
- ``create_accelerator``: an Accelerator logging to TensorBoard, on the CPU unless asked for GPUs,
  whose process group has the recipe's ``--backend`` and ``--init-method``, whose rank and world size
  agree with torch.distributed (also under DeepSpeed on the CPU), whose gradient accumulation is the
  recipe's, and whose gradients DeepSpeed clips only when its config says so.
- ``train``: a step-based loop (a step is one optimizer step, gradient accumulation included) with
  the AMCT sample's log lines (``[Train] Step[20/200] Loss: ...``), TensorBoard scalars through
  Accelerate's tracker (flushed at every log), checkpoints named after their step, periodic
  evaluation, and preemption: on SIGTERM or SIGUSR1 every rank saves a checkpoint and raises
  ``Preempted``, which ``launch.entry.run_main`` turns into exit code 75 so that a scheduler can
  requeue it; ``--resume`` continues from the latest checkpoint.
- ``evaluate``: ``[Test] Loss: 0.047416, Accuracy: 98.39% (9839/10000)`` (and top-5 when asked) over
  the whole test set, whatever the number of processes.

Log lines and files come from global rank 0 only (from torch.distributed: under some launchers
Accelerate's ``process_index`` is 0 on every rank). Before an evaluation or a checkpoint every rank
takes rank 0's buffers (BatchNorm's running statistics), which DeepSpeed, unlike DDP, lets diverge.
"""

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import urllib.parse
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, get_int_from_env
from filelock import FileLock, Timeout
from tqdm import tqdm

import lowrank
from lowrank.io import atomic_write, load_state_dict, load_weights, make_parent_dirs, save_state_dict
from lowrank.report import inspect_table

from .args import flag
from .barrier import (
    DEFAULT_TIMEOUT,
    Artifacts,
    BarrierError,
    check_identical_parameters,
    decompose_once,
    global_rank,
    load_decomposed,
    run_token,
)
from .entry import PREEMPTED_EXIT_CODE, Preempted, RunError, end_without_finalization

MODES = ("baseline", "online", "offline")


def log(line: str) -> None:
    if global_rank() == 0:
        tqdm.write(line, file=sys.stdout)  # prints above the progress bar when there is one


def _deepspeed() -> str:
    """Whether this run is under DeepSpeed ("on" or "off"), as ``accelerate launch`` tells Accelerate."""
    return "on" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else "off"


def _launcher_settings(world_size: int) -> dict:
    """The number of processes, DeepSpeed and its ZeRO stage (when the launcher's config sets it), as
    a checkpoint records them."""
    settings = {"world_size": world_size, "deepspeed": _deepspeed()}
    if settings["deepspeed"] == "on" and "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ:
        settings["zero_stage"] = os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
    return settings


def create_accelerator(*, use_gpu: bool, output_dir, backend=None, init_method="env://", **kwargs) -> Accelerator:
    """An Accelerator logging to TensorBoard in ``output_dir``, on the CPU unless ``use_gpu`` (and
    there are GPUs).

    A multi-process run's process group uses ``backend`` ("gloo" or "nccl"; None: Accelerate's choice,
    gloo on the CPU and nccl on GPUs) and ``init_method`` (env://, tcp://HOST:PORT or file:///PATH, the
    rank and world size taken from the launcher's RANK and WORLD_SIZE); a single process has none. Raises
    a RunError naming ``--backend`` for nccl without GPUs, and when the process group runs another
    backend than the one asked for (DeepSpeed on the CPU picks its own: gloo, or ccl with oneCCL).

    Under ``accelerate launch --use_deepspeed`` on a machine without GPUs, Accelerate 1.15 reports one
    process of index 0 on every rank while DeepSpeed's process group holds them all: rank 0's role,
    data sharding and DeepSpeed's batch size would all be wrong, so the state is set from
    torch.distributed, which knows the real ranks.

    Raises a RunError for a setting Accelerate refuses, and for fp16 on the CPU, where Accelerate
    would train in float32.

    Raises a RunError when the launcher sets another gradient accumulation than the recipe's
    ``gradient_accumulation_steps`` (default 1), which Accelerate would use instead. Under DeepSpeed the
    gradients are not clipped unless the config sets ``gradient_clipping``, as without DeepSpeed.
    """
    deepspeed = _deepspeed() == "on"
    if deepspeed and not use_gpu and torch.cuda.is_available():
        raise RunError("DeepSpeed runs on this machine's GPUs: pass --use-gpu, or launch without DeepSpeed")
    gpu = use_gpu and torch.cuda.is_available()  # --use-gpu on a machine without GPUs: the CPU, as in the seed
    if backend == "nccl" and not gpu:
        raise RunError(
            "--backend nccl runs on GPUs: add --use-gpu, or use --backend gloo on the CPU"
            if not use_gpu
            else "--backend nccl needs GPUs and torch sees none on this machine: use --backend gloo (the CPU)"
        )
    if backend == "nccl" and not dist.is_nccl_available():
        raise RunError("--backend nccl: this torch build has no NCCL: use --backend gloo")
    cpu = not gpu and not deepspeed  # cpu=True would turn DeepSpeed off; on a CPU-only machine it runs there
    # When Accelerate creates a process group (its own test): given to a single process, a backend
    # makes it ask torch.distributed for a world size that does not exist.
    world_size = get_int_from_env(["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE"], 1)
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or (cpu and world_size > 1)
    if launched and (backend is not None or init_method != "env://"):
        url = urllib.parse.urlsplit(init_method)
        if url.scheme == "tcp" and (url.hostname, str(url.port)) == (
            os.environ.get("MASTER_ADDR"),
            os.environ.get("MASTER_PORT"),
        ):
            raise RunError(
                f"--init-method {init_method}: the launcher already listens there (its MASTER_ADDR and "
                "MASTER_PORT, from --master_addr/--master_port): give another port, or use env://"
            )
        if url.scheme != "env" and not cpu:
            # Accelerate gives init_process_group the rank and world size on the CPU only; tcp:// and
            # file:// need them, in the URL where Accelerate leaves them out.
            separator = "&" if "?" in init_method else "?"
            rank, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            if rank is None or size is None:
                raise RunError(f"--init-method {init_method} needs the launcher's RANK and WORLD_SIZE: use env://")
            init_method = f"{init_method}{separator}rank={rank}&world_size={size}"
        # DeepSpeed without GPUs picks its own backend (gloo, or ccl with oneCCL; the check after Accelerator()
        # compares it with --backend); otherwise the one Accelerate would pick by default.
        chosen = None if deepspeed and not gpu else backend or ("nccl" if gpu else "gloo")
        handler = InitProcessGroupKwargs(backend=chosen, init_method=init_method)
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), handler]
    try:
        accelerator = Accelerator(
            cpu=cpu,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
            **kwargs,
        )
    except ValueError as error:  # a setting it refuses (bf16 on a GPU without it, fp8 without its library): named
        raise RunError(f"{error} (from the recipe's flags or the launcher's config)") from None
    # Accelerate autocasts to fp16 on GPUs only: on the CPU it would train in float32 without a word.
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise RunError(
            "mixed precision fp16 (from the recipe's flags or the launcher's config) runs on GPUs only, and "
            "this run is on the CPU: use bf16 or no"
        )
    grouped = dist.is_available() and dist.is_initialized()  # a process group, which Accelerator() may create
    if backend is not None and grouped and dist.get_backend() != backend:
        raise RunError(
            f"--backend {backend}: the process group runs {dist.get_backend()} (under DeepSpeed, DeepSpeed "
            "picks it): drop --backend"
        )
    if grouped and accelerator.num_processes != dist.get_world_size():
        for state in (PartialState(), accelerator.state):
            state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
    _check_gradient_accumulation(accelerator, kwargs.get("gradient_accumulation_steps", 1))
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None and deepspeed_plugin.is_auto("gradient_clipping"):
        # Accelerate fills an unset gradient_clipping with 1.0 when it prepares the model: DeepSpeed runs
        # would clip the gradients, and the same flags without DeepSpeed not. A value set in the config stays.
        deepspeed_plugin.deepspeed_config["gradient_clipping"] = 0.0
    if use_gpu and not gpu:
        log("--use-gpu: torch sees no GPU on this machine, running on the CPU")
    group = f" ({dist.get_backend()})" if grouped else ""
    zero = f", DeepSpeed ZeRO-{deepspeed_plugin.zero_stage}" if deepspeed_plugin is not None else ""
    log(
        f"[Setup] {accelerator.num_processes} process(es) on {accelerator.device.type}{group}, "
        f"mixed precision {accelerator.mixed_precision}{zero}"
    )
    preemption.install()
    return accelerator


def _check_gradient_accumulation(accelerator, requested: int) -> None:
    """Raises a RunError when the launcher's gradient accumulation overrides the recipe's: Accelerate
    takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (which ``accelerate launch`` sets from the config's
    ``gradient_accumulation_steps``) over its keyword, and a DeepSpeed config file's value over both."""
    plugin = accelerator.state.deepspeed_plugin
    configured = [accelerator.gradient_accumulation_steps, plugin and plugin.get_value("gradient_accumulation_steps")]
    other = next((steps for steps in configured if steps not in (None, "auto", requested)), None)
    if other is not None:
        raise RunError(
            f"the launcher sets gradient accumulation to {other} step(s), which Accelerate would use instead "
            f"of the recipe's {requested} (--gradient-accumulation-steps where the recipe has it): remove "
            'gradient_accumulation_steps from the Accelerate config file (set it to "auto" in a DeepSpeed config '
            "file), and drop accelerate launch --gradient_accumulation_steps and ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
        )


class InputFileError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names its flag and the
    file, and ends the run without a traceback."""


def prepare_model(
    model, mode, *, pretrained_path=None, info_path=None, weights_path=None, policy=None, timeout=DEFAULT_TIMEOUT
):
    """The model for ``mode``, identical on every rank. Returns ``(model, changes, seconds, reused)``."""
    start = time.perf_counter()
    changes, reused = {}, False

    def load_pretrained(dense):
        try:
            load_weights(dense, load_state_dict(pretrained_path), pretrained_path)
        except (FileNotFoundError, ValueError) as error:  # they name the file and what is wrong with it
            raise InputFileError(f"--pretrained-path: {error}") from None

    # The weights are loaded or computed, never drawn, but each path draws a different amount (a replay
    # default-initialises, a decomposition does not): the random state is left as it was, so that what
    # follows (batch order, dropout) is the same whichever path a rank or a rerun took.
    # Bad input files and rank 0's failures end the process with their message (which names the file),
    # not a traceback.
    with torch.random.fork_rng(devices=[]), _as_run_error(InputFileError, BarrierError):
        if mode == "baseline":
            if pretrained_path:
                load_pretrained(model)
            check_identical_parameters(model)
        elif mode == "online":  # the barrier compares the ranks' weights itself
            artifacts = Artifacts(Path(info_path), Path(weights_path))
            model, changes, reused = decompose_once(
                model, artifacts, load_pretrained, pretrained_path, policy, run_token(), timeout
            )
            if reused:
                log(f"[Decompose] reused the decomposition of an earlier run with the same inputs: {info_path}")
        elif mode == "offline":
            model, changes = load_decomposed(model, info_path, weights_path)
            check_identical_parameters(model)
        else:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return model, changes, time.perf_counter() - start, reused


@contextlib.contextmanager
def _as_run_error(*errors):
    """Turns ``errors`` into a RunError with their message, after the rank it comes from."""
    try:
        yield
    except errors as error:
        raise RunError(f"rank {global_rank()}: {error}") from None


class Progress:
    """Optimizer steps and batches consumed (more than steps with gradient accumulation), saved and
    restored with Accelerate's checkpoints."""

    def __init__(self):
        self.step = 0
        self.batch = 0

    def state_dict(self):
        return {"step": self.step, "batch": self.batch}

    def load_state_dict(self, state):
        self.step = state["step"]
        self.batch = state["batch"]


class Preemption:
    """SIGTERM/SIGUSR1, from ``install`` on (``create_accelerator``). While ``recording`` (the training
    loop) a signal is remembered, and ``requested`` makes every rank agree, so that they all save a
    checkpoint together at the next step; at any other time (setup, evaluation, saving) it raises
    ``Preempted`` at once, the latest checkpoint standing."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self.recording = False

    def install(self):
        self.received, self.recording = None, False
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if not self.recording:
            log(f"[Preempted] {self.received} outside the training steps: exiting with {PREEMPTED_EXIT_CODE}")
            raise Preempted

    @contextlib.contextmanager
    def recorded(self):
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def requested(self, accelerator) -> bool:
        signalled = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(signalled, reduction="sum").item() > 0)


preemption = Preemption()


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers: they ignore the preemption signals, which a launcher or
    Slurm also sends to them, so that they keep serving batches while the training process saves its
    checkpoint (by default a worker dies of them, and the training process fails before it can save).
    The training process stops them when it exits."""
    for signum in Preemption.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def from_rank_zero(value):
    """``value`` as global rank 0 has it, on every rank (as it is, on a single process)."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def rank_zero_first(load, what: str):
    """``load()`` on global rank 0, then on the other ranks (rank 0 prepares what they read: a dataset
    it unpacks or downloads). An error on any rank ends every rank with the first failing rank's
    message, after ``what`` (a RuntimeError's message says what is wrong, as the loaders raise it;
    other errors add their type): with ``main_process_first`` the others would fail in their barrier
    with gloo's traceback, or wait in the next collective until its timeout."""

    def attempt():
        try:
            return None, load()
        except Exception as error:  # any: a rank that left alone would keep the others waiting
            return str(error) if isinstance(error, RuntimeError) else f"{type(error).__name__}: {error}", None

    error, loaded = attempt() if global_rank() == 0 else (None, None)
    error = from_rank_zero(error)
    if error:  # rank 0's: the others did not try
        raise RunError(f"{what}: {error}")
    if global_rank() != 0:
        error, loaded = attempt()
    errors = [error]
    if dist.is_available() and dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    rank, error = next(((rank, error) for rank, error in enumerate(errors) if error), (None, None))
    if error:  # a path missing on another node, or not shared with it
        raise RunError(f"{what}: rank {rank}: {error}")
    return loaded


def share_rank_zero_buffers(model) -> None:
    """Gives every rank global rank 0's buffers (BatchNorm's running statistics), as DDP does at each
    forward and DeepSpeed never: each rank would evaluate with its own, and a checkpoint (rank 0's)
    would resume into other statistics than the uninterrupted run's."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# The settings a checkpoint must share with the run that resumes it. The model's structure, also for
# --test-only:
MODEL_SETTINGS = {
    "tensor_decompose": "--tensor-decompose",
    "run_mode": "--run-mode",
    "method": "--method",
    "ratio": "--ratio",
    "energy": "--energy",
    "vbmf": "--vbmf",
    "divisor": "--divisor",
    # DeepSpeed saves the model and its ZeRO shards its own way, which only DeepSpeed with as many processes reads.
    "deepspeed": "the launcher's DeepSpeed",
    # Nor does DeepSpeed load one stage's shards under another (it fails with a bare AssertionError).
    "zero_stage": "DeepSpeed's ZeRO stage",
}
# For training, also which batches come next and the optimizer's state (the others, such as --steps,
# may change; a recipe adds its own through checkpoint_to_resume's recipe_settings).
TRAINING_SETTINGS = {
    "train_batch_size": "--train-batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "seed": "--seed",
    # The optimizer's state holds them, and a resume restores it: a new value would be recorded, not used.
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "world_size": "the number of processes",
}
_CHECKPOINT = re.compile(r"step_(\d+)")
# A checkpoint is complete once this file is written, last (args.json: before the hidden-folder saves).
_COMPLETE = ("run.json", "args.json")


def _run_file(path: Path) -> Path | None:
    return next((path / name for name in _COMPLETE if (path / name).is_file()), None)


def complete_checkpoints(output_dir) -> list[Path]:
    """The complete checkpoints (``checkpoints/step_<N>`` with their ``run.json``), the latest first."""
    complete = [
        path
        for path in Path(output_dir, "checkpoints").glob("step_*")
        if _CHECKPOINT.fullmatch(path.name) and _run_file(path)
    ]
    return sorted(complete, key=lambda path: int(_CHECKPOINT.fullmatch(path.name)[1]), reverse=True)


def _shown(setting) -> str:
    """A setting as the resume message shows it: a flag left out (None) as "not given"."""
    return "not given" if setting is None else str(setting)


def _saved_settings(checkpoint: Path) -> tuple[dict | None, str | None]:
    """A complete checkpoint's ``run.json``, or what is wrong with the checkpoint: an unreadable
    ``run.json``, or files missing or of another size than when it was saved (truncated by a full disk
    or a copy cut short)."""
    run_file = _run_file(checkpoint)
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError) as error:
        return None, f"{run_file.name} cannot be read ({error})"
    if not isinstance(saved, dict) or not isinstance(saved.get("files", {}), dict):
        return None, f"{run_file.name} is not the JSON object a checkpoint saves"
    # Saved before run.json recorded it: DeepSpeed's checkpoints are those with its model folder.
    saved.setdefault("deepspeed", "on" if (checkpoint / "pytorch_model").is_dir() else "off")
    saved.setdefault("divisor", 1)  # saved before --divisor existed: ranks not rounded
    for name, size in saved.get("files", {}).items():  # checkpoints of the previous release have no sizes
        path = checkpoint / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != size:
            return None, f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return saved, None


def _tidy(folder: Path) -> None:
    """Finishes what a process killed while saving left: a partial checkpoint goes; a complete one set
    aside for a new save of its step comes back if that save never completed."""
    for partial in folder.glob(".step_*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    for replaced in folder.glob(".step_*.replaced"):
        path = folder / replaced.name[1 : -len(".replaced")]
        if path.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(replaced, path)


# Rank 0 holds its --output-dir's lock until it exits (by path: a second lock on the same file in one
# process would wait for the first).
_output_dir_locks: dict[Path, FileLock] = {}


def _lock_output_dir(output_dir) -> str | None:
    """Takes ``output_dir``'s lock, or says which job holds it: a second job there would move this one's
    checkpoints aside and write over its steps and results."""
    path = Path(output_dir, ".lock").resolve()
    if path in _output_dir_locks:
        return None
    make_parent_dirs(path)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return (
            f"another job is using --output-dir {output_dir} (it holds {path}): wait for it to end, or "
            "give this one another --output-dir. If none is, a job killed where the filesystem has no file "
            "locks left the file: delete it"
        )
    _output_dir_locks[path] = lock
    return None


def _resume_decision(args, world_size: int, recipe_settings) -> tuple[str | None, str | None]:
    """Rank 0's part of ``checkpoint_to_resume``: the checkpoint (as a string) or an error message."""
    # --test-only writes no checkpoints or results, so it takes no lock; nor does it change the
    # checkpoints, which a training job may be writing there.
    evaluating = getattr(args, "test_only", False)
    error = None if evaluating else _lock_output_dir(args.output_dir)
    if error:
        return None, error
    folder = Path(args.output_dir, "checkpoints")
    if not evaluating:
        _tidy(folder)
    checkpoints = complete_checkpoints(args.output_dir)
    if not args.resume:
        if checkpoints and not evaluating:
            aside = folder.with_name(f"checkpoints.{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(folder, aside)
            results = Path(args.output_dir, "results.json")
            if results.is_file():  # that run's, not this one's
                os.replace(results, aside / results.name)
            log(f"[Checkpoint] starting afresh (no --resume): the earlier run's checkpoints moved to {aside}")
        return None, None
    saved = None
    for checkpoint in checkpoints:
        saved, damage = _saved_settings(checkpoint)
        if saved is not None:
            break
        log(f"[Resume] {checkpoint} is damaged ({damage}): trying the one before")
    if saved is None:
        earlier = sorted(path.name for path in folder.parent.glob("checkpoints.*") if path.is_dir())
        hint = (
            f"; runs without --resume moved earlier checkpoints to {', '.join(earlier)}: move one back to "
            f"{folder} to resume from it"
            if earlier
            else ""
        )
        log(f"[Resume] no complete checkpoint in {folder}: starting afresh{hint}")
        return None, None
    settings = dict(MODEL_SETTINGS)
    current = {**vars(args), **_launcher_settings(world_size)}
    if not evaluating:
        settings |= TRAINING_SETTINGS | {name: flag(name) for name in recipe_settings}
    elif current["deepspeed"] == "on":
        settings["world_size"] = TRAINING_SETTINGS["world_size"]
    changed = [
        f"{source} {_shown(saved[key])} (now {_shown(current[key])})"
        for key, source in settings.items()
        if key in saved and key in current and saved[key] != current[key]
    ]
    if changed:
        return None, (
            f"--resume: {checkpoint} was saved with other settings: {', '.join(changed)}. Resume with "
            "the same settings, or give another --output-dir"
        )
    return str(checkpoint), None


def checkpoint_to_resume(args, world_size: int, recipe_settings=()) -> Path | None:
    """The checkpoint ``--resume`` continues from, decided by rank 0 before any work: the latest
    complete one, which must have been saved with the same MODEL_SETTINGS and, to train, the same
    TRAINING_SETTINGS and ``recipe_settings`` (names of ``args``' attributes, such as those of the
    recipe's learning-rate schedule: a scheduler's checkpoint holds its step, not its curve). A
    training run without ``--resume`` starts afresh: rank 0 moves an earlier run's checkpoints and
    results aside (to ``checkpoints.<date-time>``), so that a later ``--resume`` cannot mix them up with
    this run's. Rank 0 of a training run holds ``--output-dir``'s lock from here on: a second one there
    is refused; ``--test-only`` (``args.test_only``) takes no lock and leaves the checkpoints as they are."""
    decision = _resume_decision(args, world_size, recipe_settings) if global_rank() == 0 else None
    checkpoint, error = from_rank_zero(decision)
    if error:
        raise RunError(error)
    if checkpoint and not Path(checkpoint).is_dir():
        raise RunError(
            f"rank {global_rank()}: rank 0 resumes from {checkpoint}, which this process does not see: "
            "--output-dir must be on a filesystem every node shares"
        )
    return Path(checkpoint) if checkpoint else None


def load_checkpoint(accelerator, checkpoint: Path, progress) -> None:
    try:
        accelerator.load_state(checkpoint)
    except RuntimeError as error:  # e.g. another decomposition than the one the checkpoint was saved with
        raise RunError(
            f"{checkpoint} does not fit the model built now (was it saved with another decomposition, "
            f"info file or pretrained weights?): {error}"
        ) from None
    except Exception as error:  # damaged in a way its sizes do not show (safetensors, pickle, ...)
        raise RunError(f"{checkpoint} cannot be loaded: {type(error).__name__}: {error}") from None
    log(f"[Resume] from {checkpoint} at step {progress.step}")


def save_checkpoint(accelerator, output_dir, progress, args) -> Path:
    """Accelerate's state (model, optimizer, RNG, step) in ``checkpoints/step_<N>``, with the run's
    arguments and number of processes in ``run.json``. Written into a hidden folder renamed once
    complete: a process killed midway leaves the earlier checkpoints, and one of the same step, intact."""
    folder = Path(output_dir, "checkpoints")
    path = folder / f"step_{progress.step}"
    partial, replaced = folder / f".{path.name}.partial", folder / f".{path.name}.replaced"
    for model in accelerator._models:  # the models save_state writes
        share_rank_zero_buffers(model)
    if global_rank() == 0:
        for leftover in (partial, replaced):  # from a process killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    failed_save = functools.partial(
        _naming_a_failed_save, f"the checkpoint {path}", output_dir, "the earlier checkpoints are intact", partial
    )
    with failed_save():
        accelerator.save_state(partial)  # under DeepSpeed every rank writes its shards
    accelerator.wait_for_everyone()
    if global_rank() == 0:
        with failed_save():
            # The sizes let a resume tell a checkpoint truncated later (a full disk, a cut copy) and skip it.
            files = {
                str(file.relative_to(partial)): file.stat().st_size for file in partial.rglob("*") if file.is_file()
            }
            run = {**vars(args), **_launcher_settings(accelerator.num_processes), "files": files}
            atomic_write(partial / "run.json", lambda file: json.dump(run, file, indent=2, default=str), binary=False)
        if path.exists():
            os.replace(path, replaced)
        os.replace(partial, path)
        shutil.rmtree(replaced, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


@contextlib.contextmanager
def _naming_a_failed_save(what: str, folder, consequence: str, partial: Path | None = None):
    """Turns a failed write into an error naming ``what``, the free space in ``folder`` (torch.save says
    "iostream error" or "unexpected pos", safetensors "I/O error" on a full disk) and ``consequence``;
    rank 0 removes the ``partial`` folder."""
    try:
        yield
    except Exception as error:
        if partial is not None and global_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        existing = next(path for path in (Path(folder).absolute(), *Path(folder).absolute().parents) if path.exists())
        free = shutil.disk_usage(existing).free / 2**30
        raise RunError(
            f"rank {global_rank()}: could not save {what}: {type(error).__name__}: {error} "
            f"({free:.2f} GiB free on its disk); {consequence}"
        ) from None


def check_train_batches(samples: int, batch_size: int, processes: int) -> None:
    """Raises a RunError when the training set holds no full batch for every process (the loaders
    drop the last, partial one)."""
    if samples < batch_size * processes:
        raise RunError(
            f"--train-batch-size {batch_size} x {processes} process(es) needs at least "
            f"{batch_size * processes} training samples; the training set has {samples}"
        )


class ShuffleByEpoch(torch.utils.data.RandomSampler):
    """A random order of the dataset drawn from ``seed`` and the epoch alone (Accelerate passes the
    epoch on through ``set_epoch``): a resumed run skips into the same order as the run it continues,
    whose sampler state no checkpoint holds. Epoch 0 is the order of a RandomSampler whose generator
    is seeded with ``seed``."""

    def __init__(self, dataset, seed: int):
        super().__init__(dataset, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def batches(accelerator, loader, start_batch):
    """Batches forever, epoch after epoch; after a resume, the epoch and position of ``start_batch``."""
    epoch, skip = divmod(start_batch, len(loader))
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def train(
    accelerator,
    model,
    optimizer,
    loader,
    progress,
    *,
    steps,
    log_steps,
    output_dir,
    args,
    loss_fn=F.nll_loss,
    scheduler=None,
    checkpoint_steps=0,
    eval_steps=0,
    eval_fn=None,
    throughput_unit=None,
):
    """Trains until ``progress.step == steps`` (optimizer steps; the Accelerator's
    ``gradient_accumulation_steps`` batches each). ``eval_fn()`` runs every ``eval_steps`` steps before
    the last; ``throughput_unit`` (e.g. "images/s") adds the throughput of the training alone (not of
    checkpoints and evaluations) to the log line. Saves a checkpoint after the last step, so that a
    signal during the final evaluation (which stops at once) loses no training, and returns; or raises
    ``Preempted`` after saving a checkpoint when the job is preempted (also by a signal during that
    last save, once it is complete)."""
    model.train()
    first_step = progress.step
    samples, started = 0, time.perf_counter()
    bar = tqdm(total=steps, initial=progress.step, unit="step", disable=global_rank() != 0 or not sys.stdout.isatty())
    if progress.step >= steps:  # resumed from a checkpoint of a longer run
        log(f"[Train] already at step {progress.step} of {steps}: nothing to train")
    else:  # from the process's creation, imports included: the launch overhead users wait for
        log(f"[Train] first step at {time.time() - psutil.Process().create_time():.2f} s after start")
    with preemption.recorded():  # signals wait for the next step boundary
        # None when resumed at the last step: not even the loader's workers start.
        for data, target in batches(accelerator, loader, progress.batch) if progress.step < steps else ():
            with accelerator.accumulate(model):
                loss = loss_fn(model(data), target)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            progress.batch += 1
            samples += len(data) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if scheduler is not None:
                scheduler.step()
            progress.step += 1
            bar.update()
            if progress.step % log_steps == 0 or progress.step == steps:
                loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
                throughput = samples / (time.perf_counter() - started)
                line = f"[Train] Step[{progress.step}/{steps}] Loss: {loss_value:.6f}"
                log(f"{line}, {throughput:.1f} {throughput_unit}" if throughput_unit else line)
                lr = optimizer.param_groups[0]["lr"]
                accelerator.log(
                    {"train/loss": loss_value, "train/lr": lr, "train/samples_per_s": throughput}, step=progress.step
                )
                samples, started = 0, time.perf_counter()
            if progress.step >= steps:
                break
            # Between optimizer steps only, so that a checkpoint never holds half-accumulated gradients.
            if preemption.requested(accelerator):
                _exit_preempted(accelerator, save_checkpoint(accelerator, output_dir, progress, args))
            paused = time.perf_counter()
            if checkpoint_steps and progress.step % checkpoint_steps == 0:
                save_checkpoint(accelerator, output_dir, progress, args)
            if eval_fn and eval_steps and progress.step % eval_steps == 0:
                eval_fn()
                model.train()
            started += time.perf_counter() - paused  # the throughput's clock stops while they run
        bar.close()
        if progress.step > first_step:
            path = save_checkpoint(accelerator, output_dir, progress, args)
            # A signal in the last step or during this save stops the run now, the checkpoint complete.
            if preemption.requested(accelerator):
                _exit_preempted(accelerator, path)


def _exit_preempted(accelerator, checkpoint: Path) -> None:
    cause = preemption.received or "signal on another rank"
    log(f"[Preempted] {cause}: checkpoint saved to {checkpoint}, exiting with {PREEMPTED_EXIT_CODE}")
    end_run(accelerator)
    raise Preempted


@torch.no_grad()
def evaluate(accelerator, model, loader, step=None, loss_fn=F.nll_loss, top5=False) -> dict:
    """Mean loss and accuracy (top-1, and top-5 when asked) over the whole test set on all processes;
    logs the ``[Test]`` line. Returns ``{"loss", "accuracy", "correct", "total"[, "top5_accuracy"]}``."""
    share_rank_zero_buffers(model)
    model.eval()
    losses, hits = [], []
    for data, target in loader:
        output = model(data)
        loss = loss_fn(output, target, reduction="none")
        ranked = output.topk(min(5, output.shape[1]) if top5 else 1, dim=1).indices
        hit = ranked.eq(target[:, None]).cumsum(dim=1)  # hit[:, k-1]: target among the first k
        loss, hit = accelerator.gather_for_metrics((loss, hit))
        losses.append(loss)
        hits.append(hit)
    losses, hits = torch.cat(losses), torch.cat(hits)
    total, correct = len(hits), int(hits[:, 0].sum().item())
    results = {"loss": losses.float().mean().item(), "accuracy": correct / total, "correct": correct, "total": total}
    line = f"[Test] Loss: {results['loss']:.6f}, Accuracy: {100 * correct / total:.2f}% ({correct}/{total})"
    if top5:
        results["top5_accuracy"] = hits[:, -1].sum().item() / total
        line += f", Top-5: {100 * results['top5_accuracy']:.2f}%"
    log(line)
    accelerator.log(
        {f"test/{name}": value for name, value in results.items() if "accuracy" in name or name == "loss"}, step=step
    )
    return results


def model_cost(model, example_input) -> dict:
    """Parameters and multiply-adds of the model as built (before ``accelerator.prepare``: under
    DeepSpeed ZeRO-3 the prepared model's parameters are sharded), and the input shape they were
    counted on."""
    return {
        "params": lowrank.count_parameters(model),
        "flops": lowrank.count_flops(model, example_input),
        "flops_input_shape": list(example_input.shape),
    }


def finish(accelerator, model, progress, args, results: dict) -> None:
    """The end of a run (its last checkpoint saved by ``train``): from rank 0 ``results.json`` in
    ``--output-dir`` (``results`` and the step reached) and the trained weights at ``--save-path``,
    then ``end_run``."""
    state_dict = accelerator.get_state_dict(model)  # on every rank: under DeepSpeed ZeRO-3 it gathers the shards
    if global_rank() == 0:
        # Strict JSON, which other tools read too: a diverged run's NaN or infinite loss becomes null.
        results = {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in results.items()
        }
        results["steps"] = progress.step
        rerun = "the last checkpoint holds the trained weights: rerun with --resume to write them again"
        with _naming_a_failed_save(f"the results in {args.output_dir}", args.output_dir, rerun):
            atomic_write(
                Path(args.output_dir) / "results.json",
                lambda file: json.dump(results, file, indent=2, allow_nan=False),
                binary=False,
            )
        if args.save_path:
            with _naming_a_failed_save(f"--save-path {args.save_path}", Path(args.save_path).parent, rerun):
                save_state_dict(state_dict, args.save_path)
            log(f"Weights saved to {args.save_path}")
    end_run(accelerator)


def end_run(accelerator) -> None:
    """Ends the trackers, the output folder's lock and, through ``launch.entry.run_main``, the process: a
    multi-process run ends it without the interpreter's finalization (``entry.end_without_finalization``;
    destroy_process_group cannot stop gloo's threads while the prepared model keeps the group)."""
    accelerator.end_training()
    # Released here, not by os._exit: on a filesystem without file locks the lock is a file to delete.
    while _output_dir_locks:
        _output_dir_locks.popitem()[1].release()
    if accelerator.num_processes > 1:
        end_without_finalization()


def log_decomposition(accelerator, dense_model, cost, changes, seconds, example_input, info_path=None) -> dict:
    """Parameters and FLOPs before/after (``cost``: the decomposed model's ``model_cost``), time taken
    and the per-layer table, to the log and TensorBoard."""
    before = model_cost(dense_model, example_input)
    summary = {
        "decomposition/params_before": before["params"],
        "decomposition/params_after": cost["params"],
        "decomposition/flops_before": before["flops"],
        "decomposition/flops_after": cost["flops"],
        "decomposition/seconds": seconds,
        "decomposition/layers": len(changes),
    }
    params = f"{summary['decomposition/params_before']:,} -> {summary['decomposition/params_after']:,}"
    flops = f"{summary['decomposition/flops_before']:,} -> {summary['decomposition/flops_after']:,}"
    log(f"[Decompose] {len(changes)} layer(s) in {seconds:.2f} s: parameters {params}, FLOPs {flops}")
    if info_path and Path(info_path).is_file():
        accelerator.log({"decomposition/table": "<pre>" + inspect_table(info_path) + "</pre>"}, step=0)
    accelerator.log(summary, step=0)
    return summary
