"""Training and evaluation for the recipes, through Accelerate.

- ``prepare_model``: the model of each mode: ``baseline`` (dense, optionally loaded), ``online``
  (rank 0 decomposes behind the barrier, the others load its artifacts), ``offline`` (every rank
  replays the info file and loads the decomposed weights).
- ``train``: a step-based loop with the AMCT sample's log lines (``[Train] Step[20/200] Loss: ...``),
  TensorBoard scalars through Accelerate's tracker (flushed at every log), checkpoints named after
  their step, and preemption: on SIGTERM or SIGUSR1 every rank saves a checkpoint and the process
  exits with ``PREEMPTED_EXIT_CODE`` so that a scheduler can requeue it; ``--resume`` continues from
  the latest checkpoint.
- ``evaluate``: ``[Test] Loss: 0.047416, Accuracy: 98.39% (9839/10000)`` over the whole test set,
  whatever the number of processes.

Log lines and files come from global rank 0 only (from torch.distributed: under some launchers
Accelerate's ``process_index`` is 0 on every rank).
"""

import json
import signal
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lowrank
from lowrank.cli import inspect_table
from lowrank.io import load_state_dict

from .barrier import (
    DEFAULT_TIMEOUT,
    Artifacts,
    check_identical_parameters,
    decompose_once,
    global_rank,
    load_decomposed,
    run_token,
)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; resume with --resume
MODES = ("baseline", "online", "offline")


def log(line: str) -> None:
    if global_rank() == 0:
        tqdm.write(line, file=sys.stdout)  # prints above the progress bar when there is one


def prepare_model(
    model, mode, *, pretrained_path=None, info_path=None, weights_path=None, policy=None, timeout=DEFAULT_TIMEOUT
):
    """The model for ``mode``, identical on every rank. Returns ``(model, changes, seconds, reused)``."""
    start = time.perf_counter()
    changes, reused = {}, False
    if mode == "baseline":
        if pretrained_path:
            model.load_state_dict(load_state_dict(pretrained_path))
        check_identical_parameters(model)
    elif mode == "online":  # the barrier compares the ranks' weights itself

        def load_pretrained(dense):
            dense.load_state_dict(load_state_dict(pretrained_path))

        artifacts = Artifacts(Path(info_path), Path(weights_path))
        model, changes, reused = decompose_once(
            model, artifacts, load_pretrained, pretrained_path, policy, run_token(), timeout
        )
    elif mode == "offline":
        model, changes = load_decomposed(model, info_path, weights_path)
        check_identical_parameters(model)
    else:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return model, changes, time.perf_counter() - start, reused


class Progress:
    """The step counter, saved and restored with Accelerate's checkpoints."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class Preemption:
    """Remembers SIGTERM/SIGUSR1; ``requested`` makes every rank agree, so they all checkpoint together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def latest_checkpoint(output_dir) -> Path | None:
    checkpoints = sorted(Path(output_dir, "checkpoints").glob("step_*"), key=lambda path: int(path.name.split("_")[1]))
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(accelerator, output_dir, progress, args) -> Path:
    """Accelerate's state (model, optimizer, RNG, step) in ``checkpoints/step_<N>``, plus the run's arguments."""
    path = Path(output_dir, "checkpoints", f"step_{progress.step}")
    accelerator.save_state(path)
    if global_rank() == 0:
        (path / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    accelerator.wait_for_everyone()
    return path


def batches(accelerator, loader, start_step):
    """Batches forever, epoch after epoch; after a resume, the epoch and position of ``start_step``."""
    epoch, skip = divmod(start_step, len(loader))
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def train(accelerator, model, optimizer, loader, progress, *, steps, log_steps, output_dir, args, checkpoint_steps=0):
    """Trains until ``progress.step == steps``. Returns normally, or exits with PREEMPTED_EXIT_CODE
    after saving a checkpoint when the job is preempted."""
    preemption = Preemption()
    model.train()
    samples, started = 0, time.perf_counter()
    bar = tqdm(total=steps, initial=progress.step, unit="step", disable=global_rank() != 0 or not sys.stdout.isatty())
    # From the process's creation, imports included: the launch overhead users wait for.
    log(f"[Train] first step at {time.time() - psutil.Process().create_time():.2f} s after start")
    for data, target in batches(accelerator, loader, progress.step):
        if progress.step >= steps:
            break
        if preemption.requested(accelerator):
            path = save_checkpoint(accelerator, output_dir, progress, args)
            cause = preemption.received or "signal on another rank"
            log(f"[Preempted] {cause}: checkpoint saved to {path}, exiting with {PREEMPTED_EXIT_CODE}")
            accelerator.end_training()
            sys.exit(PREEMPTED_EXIT_CODE)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        accelerator.backward(loss)
        optimizer.step()
        progress.step += 1
        bar.update()
        samples += len(data) * accelerator.num_processes
        if progress.step % log_steps == 0 or progress.step == steps:
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            throughput = samples / (time.perf_counter() - started)
            log(f"[Train] Step[{progress.step}/{steps}] Loss: {loss_value:.6f}")
            lr = optimizer.param_groups[0]["lr"]
            accelerator.log(
                {"train/loss": loss_value, "train/lr": lr, "train/samples_per_s": throughput}, step=progress.step
            )
            samples, started = 0, time.perf_counter()
        if checkpoint_steps and progress.step % checkpoint_steps == 0 and progress.step < steps:
            save_checkpoint(accelerator, output_dir, progress, args)
    bar.close()


@torch.no_grad()
def evaluate(accelerator, model, loader, step=None) -> tuple[float, int, int]:
    """Mean loss, correct predictions and test-set size over all processes; logs the ``[Test]`` line."""
    model.eval()
    losses, correct = [], []
    for data, target in loader:
        output = model(data)
        loss = F.nll_loss(output, target, reduction="none")
        hits = output.argmax(dim=1).eq(target)
        loss, hits = accelerator.gather_for_metrics((loss, hits))
        losses.append(loss)
        correct.append(hits)
    losses, correct = torch.cat(losses), torch.cat(correct)
    mean_loss, right, total = losses.mean().item(), int(correct.sum().item()), len(correct)
    log(f"[Test] Loss: {mean_loss:.6f}, Accuracy: {100 * right / total:.2f}% ({right}/{total})")
    accelerator.log({"test/loss": mean_loss, "test/accuracy": right / total}, step=step)
    return mean_loss, right, total


def log_decomposition(accelerator, dense_model, model, changes, seconds, example_input, info_path=None) -> dict:
    """Parameters and FLOPs before/after, time taken and the per-layer table, to the log and TensorBoard."""
    summary = {
        "decomposition/params_before": lowrank.count_parameters(dense_model),
        "decomposition/params_after": lowrank.count_parameters(model),
        "decomposition/flops_before": lowrank.count_flops(dense_model, example_input),
        "decomposition/flops_after": lowrank.count_flops(model, example_input),
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
