"""The model of each mode, identical on every rank: ``baseline`` (dense, optionally loaded),
``online`` (rank 0 decomposes behind the barrier, the others load its artifacts), ``offline`` (every
rank replays the info file and loads the decomposed weights); and its cost, logged."""

import contextlib
import copy
import functools
import itertools
import time
from pathlib import Path

import torch
import torchvision

import lowrank
from lowrank.io import load_state_dict, load_weights
from lowrank.report import inspect_table

from .args import RunMode, policy_of
from .barrier import (
    DEFAULT_TIMEOUT,
    Artifacts,
    BarrierError,
    check_identical_parameters,
    decompose_once,
    load_decomposed,
    run_token,
)
from .checkpoints import checkpoint_step
from .distributed import global_rank, log, on_every_rank
from .entry import RunError

MODES = ("baseline", "online", "offline")


class InputFileError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names its flag and the
    file, and ends the run without a traceback."""


def load_pretrained_weights(model, path) -> None:
    """Loads ``--pretrained-path`` ``path`` into ``model``, or raises an InputFileError naming the flag."""
    try:
        load_weights(model, load_state_dict(path), path)
    except (FileNotFoundError, ValueError) as error:  # they name the file and what is wrong with it
        raise InputFileError(f"--pretrained-path: {error}") from None


def prepare_model(
    model,
    mode,
    *,
    pretrained_path=None,
    info_path=None,
    weights_path=None,
    policy=None,
    timeout=DEFAULT_TIMEOUT,
    calibration=None,
):
    """The model for ``mode``, identical on every rank; online, ``calibration()`` gives rank 0 the batches
    the decomposition fits (``decompose_once``). Returns ``(model, changes, seconds, reused)``."""
    start = time.perf_counter()
    changes, reused = {}, False
    load_pretrained = functools.partial(load_pretrained_weights, path=pretrained_path)

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
                model, artifacts, load_pretrained, pretrained_path, policy, run_token(), timeout, calibration
            )
            if reused:
                log(f"[Decompose] reused the decomposition of an earlier run with the same inputs: {info_path}")
        elif mode == "offline":  # every rank reads the files: one missing on a node stops them all at once
            model, changes = on_every_rank(lambda: load_decomposed(model, info_path, weights_path))
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


def model_cost(model, example_input) -> dict:
    """Parameters and multiply-adds of the model as built (before ``accelerator.prepare``: under
    DeepSpeed ZeRO-3 the prepared model's parameters are sharded), and the input shape they were
    counted on."""
    return {
        "params": lowrank.count_parameters(model),
        "flops": lowrank.count_flops(model, example_input),
        "flops_input_shape": list(example_input.shape),
    }


def log_decomposition(
    accelerator, dense_model, cost, changes, seconds, example_input, info_path=None, tensorboard=True
) -> dict:
    """Parameters and FLOPs before/after (``cost``: the decomposed model's ``model_cost``), time taken
    and the per-layer table, to the log and, with ``tensorboard``, to TensorBoard at step 0."""
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
    if tensorboard and info_path and Path(info_path).is_file():
        accelerator.log({"decomposition/table": "<pre>" + inspect_table(info_path) + "</pre>"}, step=0)
    if tensorboard:
        accelerator.log(summary, step=0)
    return summary


def calibration_reader(dataset, batches: int, batch_size: int):
    """What reads the calibration data of ``--calibration-batches`` (None for 0): the inputs of the first
    ``batches`` batches of ``dataset`` (the training images with the evaluation transforms), in order."""
    if not batches:
        return None

    def read():
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        inputs = [data for data, _ in itertools.islice(loader, batches)]
        if len(inputs) < batches:
            raise RunError(f"--calibration-batches {batches}: the training set holds {len(inputs)} batch(es)")
        log(f"[Decompose] fitting the decomposition to {batches} training batch(es) of {batch_size}")
        return inputs

    return read


def setup_model(
    accelerator, dense, run: RunMode, args, example_input, project: str, resume_from=None, calibration_set=None
):
    """The recipes' model setup: ``prepare_model`` on a copy of ``dense`` for ``run`` (from
    ``check_mode_args``) with the rank rule and barrier flags of ``launch.args`` (``--calibration-batches``
    of ``calibration_set``, the training set with the evaluation transforms), then TensorBoard's run
    ``<project>_<mode>`` started (only now: a run that fails on its inputs leaves no empty one), and
    the cost of the model on ``example_input``, with the decomposition logged when there is one. A run
    resumed from the checkpoint ``resume_from`` continues TensorBoard's run: the events an interrupted
    run logged after that checkpoint are purged, and the decomposition's, logged at its start, are not
    logged again. Returns ``(model, cost)``."""
    model, changes, seconds, _ = prepare_model(
        copy.deepcopy(dense),
        run.mode,
        pretrained_path=args.pretrained_path,
        info_path=run.decompose_info_path,
        weights_path=run.decomposed_weights_path,
        policy=policy_of(args, example_input),
        timeout=args.barrier_timeout,
        calibration=calibration_reader(calibration_set, args.calibration_batches, args.train_batch_size),
    )
    config = {key: value for key, value in {**vars(args), **run.settings()}.items() if value is not None}
    purge = {"tensorboard": {"purge_step": checkpoint_step(resume_from) + 1}} if resume_from else {}
    accelerator.init_trackers(f"{project}_{run.mode}", config=config, init_kwargs=purge)
    cost = model_cost(model, example_input)
    if run.mode != "baseline":
        log_decomposition(
            accelerator, dense, cost, changes, seconds, example_input, run.decompose_info_path, not resume_from
        )
    return model, cost


def torchvision_classifier(name: str, classes: int, image_size: int = 224) -> torch.nn.Module:
    """torchvision's classifier ``name`` with ``classes`` outputs; a vision transformer is built for
    ``image_size`` images, a size it fixes when it is built."""
    options = {"image_size": image_size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, num_classes=classes, **options)
