"""Checkpoints in ``--output-dir``: saved atomically (a hidden folder renamed once complete, with the
sizes of its files), the latest complete one found and checked against the run's settings on
``--resume``, an earlier run's set aside otherwise, and the folder locked against a second job."""

import contextlib
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock, Timeout

from lowrank.io import atomic_write, make_parent_dirs

from .accelerator import launcher_settings
from .args import flag
from .distributed import from_rank_zero, global_rank, log, share_rank_zero_buffers
from .entry import RunError


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
    "budget": "--budget",
    "calibration_batches": "--calibration-batches",
    "sequential_calibration": "--sequential-calibration",
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
    # The objective: a resumed run distils as the run it continues did.
    "distill": "--distill",
    "distill_alpha": "--distill-alpha",
    "distill_temperature": "--distill-temperature",
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
    saved.setdefault("distill", False)  # saved before --distill existed: trained on the task loss alone
    saved.setdefault("calibration_batches", 0)  # saved before it existed: decomposed from the weights alone
    saved.setdefault("sequential_calibration", False)
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


def release_output_dir_locks() -> None:
    """Releases the ``--output-dir`` locks rank 0 holds (at the end of a run: on a filesystem without file
    locks the lock is a file to delete, which os._exit would leave)."""
    while _output_dir_locks:
        _output_dir_locks.popitem()[1].release()


def _resume_decision(settings: Mapping, world_size: int, recipe_settings) -> tuple[str | None, str | None]:
    """Rank 0's part of ``checkpoint_to_resume``: the checkpoint (as a string) or an error message."""
    # --test-only writes no checkpoints or results, so it takes no lock; nor does it change the
    # checkpoints, which a training job may be writing there.
    evaluating = settings.get("test_only", False)
    error = None if evaluating else _lock_output_dir(settings["output_dir"])
    if error:
        return None, error
    folder = Path(settings["output_dir"], "checkpoints")
    if not evaluating:
        _tidy(folder)
    resume = settings["resume"]
    if not resume:
        if not evaluating:
            _set_aside(settings["output_dir"], settings.get("keep_runs"))
        return None, None
    if resume is True:
        checkpoint, saved = _latest_intact(folder)
        if checkpoint is None:
            return None, None
    else:
        checkpoint = Path(resume).absolute()
        if not (checkpoint.is_dir() and _CHECKPOINT.fullmatch(checkpoint.name) and _run_file(checkpoint)):
            return None, f"--resume {resume}: not a complete checkpoint (a step_<N> folder with its run.json)"
        saved, damage = _saved_settings(checkpoint)
        if saved is None:
            return None, f"--resume {resume} is damaged ({damage})"
    compared = dict(MODEL_SETTINGS)
    current = {**settings, **launcher_settings(world_size)}
    if not evaluating:
        compared |= TRAINING_SETTINGS | {name: flag(name) for name in recipe_settings}
    elif current["deepspeed"] == "on":
        compared["world_size"] = TRAINING_SETTINGS["world_size"]
    changed = [
        f"{source} {_shown(saved[key])} (now {_shown(current[key])})"
        for key, source in compared.items()
        if key in saved and key in current and saved[key] != current[key]
    ]
    if changed:
        return None, (
            f"--resume: {checkpoint} was saved with other settings: {', '.join(changed)}. Resume with "
            "the same settings, or give another --output-dir"
        )
    return str(checkpoint), None


def _latest_intact(folder: Path) -> tuple[Path | None, dict | None]:
    """The latest complete checkpoint in ``folder`` that is not damaged, with its saved settings."""
    for checkpoint in complete_checkpoints(folder.parent):
        saved, damage = _saved_settings(checkpoint)
        if saved is not None:
            return checkpoint, saved
        log(f"[Resume] {checkpoint} is damaged ({damage}): trying the one before")
    earlier = sorted(path.name for path in folder.parent.glob("checkpoints.*") if path.is_dir())
    hint = (
        f"; runs without --resume moved earlier checkpoints to {', '.join(earlier)}: move one back to "
        f"{folder} to resume from it"
        if earlier
        else ""
    )
    log(f"[Resume] no complete checkpoint in {folder}: starting afresh{hint}")
    return None, None


def _set_aside(output_dir, keep_runs: int | None) -> None:
    """A run without --resume starts afresh: an earlier run's checkpoints and results move to
    ``checkpoints.<date-time>``, of which the newest ``keep_runs`` stay (None: all)."""
    folder = Path(output_dir, "checkpoints")
    if complete_checkpoints(output_dir):
        aside = folder.with_name(f"checkpoints.{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(folder, aside)
        results = Path(output_dir, "results.json")
        if results.is_file():  # that run's, not this one's
            os.replace(results, aside / results.name)
        log(f"[Checkpoint] starting afresh (no --resume): the earlier run's checkpoints moved to {aside}")
    if keep_runs is not None:
        earlier = sorted((path for path in folder.parent.glob("checkpoints.*") if path.is_dir()), reverse=True)
        for old in earlier[keep_runs:]:
            shutil.rmtree(old, ignore_errors=True)
            log(f"[Checkpoint] removed {old}, an earlier run's (--keep-runs {keep_runs})")


def checkpoint_to_resume(settings: Mapping, world_size: int, recipe_settings=()) -> Path | None:
    """The checkpoint ``--resume`` continues from, decided by rank 0 before any work. ``settings`` is the
    run's, a plain dict under the flags' names (``output_dir``, ``resume``: True for the latest complete
    checkpoint or a checkpoint's path, ``test_only``, ``keep_runs``, the model's and the training's
    settings; a checkpoint records it). The checkpoint must have been saved with the same
    MODEL_SETTINGS and, to train, the same TRAINING_SETTINGS and ``recipe_settings`` (more names of
    ``settings``, such as those of the recipe's learning-rate schedule: a scheduler's checkpoint holds
    its step, not its curve). A training run without ``--resume`` starts afresh: rank 0 moves an
    earlier run's checkpoints and results aside (to ``checkpoints.<date-time>``, of which it keeps the
    newest ``keep_runs``), so that a later ``--resume`` cannot mix them up with this run's. Rank 0 of a
    training run holds ``--output-dir``'s lock from here on: a second one there is refused;
    ``--test-only`` takes no lock and leaves the checkpoints as they are."""
    decision = _resume_decision(settings, world_size, recipe_settings) if global_rank() == 0 else None
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


def save_checkpoint(accelerator, output_dir, progress, settings: Mapping) -> Path:
    """Accelerate's state (model, optimizer, RNG, step) in ``checkpoints/step_<N>``, with the run's
    ``settings`` (see ``checkpoint_to_resume``) and number of processes in ``run.json``. Written into a
    hidden folder renamed once complete: a process killed midway leaves the earlier checkpoints, and one
    of the same step, intact. Once it is complete, only the newest ``settings["keep_last"]`` stay."""
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
        naming_a_failed_save, f"the checkpoint {path}", output_dir, "the earlier checkpoints are intact", partial
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
            run = {**settings, **launcher_settings(accelerator.num_processes), "files": files}
            atomic_write(partial / "run.json", lambda file: json.dump(run, file, indent=2, default=str), binary=False)
        if path.exists():
            os.replace(path, replaced)
        os.replace(partial, path)
        shutil.rmtree(replaced, ignore_errors=True)
        _keep_newest(output_dir, settings.get("keep_last"), path)
    accelerator.wait_for_everyone()
    return path


def _keep_newest(output_dir, keep: int | None, saved: Path) -> None:
    """Removes all but the ``keep`` newest complete checkpoints of this run (None: keeps all), the one
    just ``saved`` always among them. Newest by when they were saved, not by step: after a resume from
    an earlier step, the checkpoints of the steps that followed it are the older ones."""
    if keep is None:
        return
    others = [path for path in complete_checkpoints(output_dir) if path != saved]
    others.sort(key=lambda path: (_run_file(path).stat().st_mtime, checkpoint_step(path)), reverse=True)
    for old in others[keep - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at, from its name ``step_<N>``."""
    return int(_CHECKPOINT.fullmatch(Path(checkpoint).name)[1])


@contextlib.contextmanager
def naming_a_failed_save(what: str, folder, consequence: str, partial: Path | None = None):
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
