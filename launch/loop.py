"""The training loop and evaluation, with the AMCT sample's log lines.

``train`` counts optimizer steps (gradient accumulation included), logs ``[Train] Step[20/200] Loss:
...`` and TensorBoard scalars, saves checkpoints, evaluates, and handles preemption; ``evaluate`` logs
``[Test] Loss: 0.047416, Accuracy: 98.39% (9839/10000)`` over the whole test set, whatever the number
of processes; ``finish`` writes ``results.json`` and the trained weights from rank 0. Before an
evaluation or a checkpoint every rank takes rank 0's buffers (BatchNorm's running statistics), which
DeepSpeed, unlike DDP, lets diverge.
"""

import contextlib
import datetime
import json
import math
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowrank.io import atomic_write, save_state_dict

from .checkpoints import naming_a_failed_save, release_output_dir_locks, save_checkpoint
from .distributed import global_rank, log, share_rank_zero_buffers
from .entry import PREEMPTED_EXIT_CODE, Preempted, RunError, end_without_finalization
from .preemption import preemption


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


def shuffling_seed() -> int:
    """The seed a DataLoader built with ``shuffle=True`` draws from the global RNG for its sampler at
    its first batch: the second draw, after the base seed of its workers. Seeding ShuffleByEpoch with
    it gives such a loader's first epoch (the AMCT sample's batches) where ``torch.manual_seed`` and
    the model's initialisation came first."""
    torch.empty((), dtype=torch.int64).random_()  # the workers' base seed
    return int(torch.empty((), dtype=torch.int64).random_().item())


def batches(accelerator, loader, start_batch):
    """Batches forever, epoch after epoch; after a resume, the epoch and position of ``start_batch``."""
    epoch, skip = divmod(start_batch, len(loader))
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


class Objective:
    """What ``train`` minimises on a batch: the recipe's loss, ``loss_fn(output, target)``. An objective
    that needs more of the batch (``launch.distill.Distillation``: the teacher's output on its inputs)
    overrides ``__call__``; the named terms it returns are logged beside the loss."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __call__(self, output, target, data) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise, and its terms by name (none here)."""
        return self.loss_fn(output, target), {}


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
    settings,
    loss_fn=F.nll_loss,
    scheduler=None,
    checkpoint_steps=0,
    eval_steps=0,
    eval_fn=None,
    throughput_unit="samples/s",
):
    """Trains until ``progress.step == steps`` (optimizer steps; the Accelerator's
    ``gradient_accumulation_steps`` batches each) on ``loss_fn(output, target)``, or on an ``Objective``.
    ``eval_fn()`` runs every ``eval_steps`` steps before the last. Each log line adds to the AMCT
    sample's ``[Train] Step[20/200] Loss: ...`` the objective's terms when it has any, the throughput
    of the training alone (not of checkpoints and evaluations) in ``throughput_unit``, the learning rate
    and the time left. Checkpoints go to ``output_dir`` with the run's
    ``settings`` (``checkpoints.save_checkpoint``). Saves a checkpoint after the last step, so that a
    signal during the final evaluation (which stops at once) loses no training, and returns; or raises
    ``Preempted`` after saving a checkpoint when the job is preempted (also by a signal during that
    last save, once it is complete)."""
    objective = loss_fn if isinstance(loss_fn, Objective) else Objective(loss_fn)
    model.train()
    first_step = progress.step
    meter = _Throughput(progress.step)
    bar = tqdm(total=steps, initial=progress.step, unit="step", disable=global_rank() != 0 or not sys.stdout.isatty())
    if progress.step >= steps:  # resumed from a checkpoint of a longer run
        log(f"[Train] already at step {progress.step} of {steps}: nothing to train")
    else:  # from the process's creation, imports included: the launch overhead users wait for
        log(f"[Train] first step at {time.time() - psutil.Process().create_time():.2f} s after start")
    with preemption.recorded():  # signals wait for the next step boundary
        # None when resumed at the last step: not even the loader's workers start.
        for data, target in batches(accelerator, loader, progress.batch) if progress.step < steps else ():
            with accelerator.accumulate(model):
                loss, terms = objective(model(data), target, data)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            progress.batch += 1
            meter.samples += len(data) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if scheduler is not None:
                scheduler.step()
            progress.step += 1
            bar.update()
            if progress.step % log_steps == 0 or progress.step == steps:
                _log_step(accelerator, optimizer, progress, steps, loss, terms, meter, throughput_unit)
            if progress.step >= steps:
                break
            # Between optimizer steps only, so that a checkpoint never holds half-accumulated gradients.
            if preemption.requested(accelerator):
                _exit_preempted(accelerator, save_checkpoint(accelerator, output_dir, progress, settings))
            with meter.paused():  # the throughput's clock stops while they run
                if checkpoint_steps and progress.step % checkpoint_steps == 0:
                    save_checkpoint(accelerator, output_dir, progress, settings)
                if eval_fn and eval_steps and progress.step % eval_steps == 0:
                    eval_fn()
                    model.train()
        bar.close()
        if progress.step > first_step:
            path = save_checkpoint(accelerator, output_dir, progress, settings)
            # A signal in the last step or during this save stops the run now, the checkpoint complete.
            if preemption.requested(accelerator):
                _exit_preempted(accelerator, path)


class _Throughput:
    """Samples trained since the last log line, over the time spent training (pauses left out), and the
    time left, from the training time per step since this process started training."""

    def __init__(self, first_step: int):
        self.samples, self.first_step, self.paused_seconds = 0, first_step, 0.0
        self.started = self.run_started = time.perf_counter()

    def per_second(self) -> float:
        value = self.samples / (time.perf_counter() - self.started)
        self.samples, self.started = 0, time.perf_counter()
        return value

    def seconds_left(self, step: int, steps: int) -> float:
        done = step - self.first_step
        trained = time.perf_counter() - self.run_started - self.paused_seconds
        return trained / done * (steps - step) if done > 0 else 0.0

    @contextlib.contextmanager
    def paused(self):
        paused = time.perf_counter()
        yield
        seconds = time.perf_counter() - paused
        self.started += seconds
        self.paused_seconds += seconds


def _log_step(accelerator, optimizer, progress, steps, loss, terms: dict, meter: _Throughput, unit) -> None:
    """The AMCT sample's ``[Train]`` line, followed by the objective's ``terms`` (``(task 0.1, distill
    0.2)``), the throughput, the learning rate and the time left; and TensorBoard's scalars: the loss
    and each term (``train/<name>_loss``) averaged over the ranks, the learning rate, the throughput."""
    # One collective for the loss and its terms.
    values = accelerator.reduce(torch.stack([loss, *terms.values()]).detach(), reduction="mean").tolist()
    loss_value, term_values = values[0], dict(zip(terms, values[1:]))
    throughput = meter.per_second()
    lr = optimizer.param_groups[0]["lr"]
    left = datetime.timedelta(seconds=round(meter.seconds_left(progress.step, steps)))
    line = f"[Train] Step[{progress.step}/{steps}] Loss: {loss_value:.6f}"
    if term_values:
        line += f" ({', '.join(f'{name} {value:.6f}' for name, value in term_values.items())})"
    log(f"{line}, {throughput:.1f} {unit}, lr {lr:.6g}, {left} left")
    scalars = {"train/loss": loss_value, "train/learning_rate": lr, "train/samples_per_s": throughput}
    scalars |= {f"train/{name}_loss": value for name, value in term_values.items()}
    accelerator.log(scalars, step=progress.step)


def _exit_preempted(accelerator, checkpoint: Path) -> None:
    cause = preemption.received or "signal on another rank"
    log(f"[Preempted] {cause}: checkpoint saved to {checkpoint}, exiting with {PREEMPTED_EXIT_CODE}")
    end_run(accelerator)
    raise Preempted


@torch.no_grad()
def evaluate(accelerator, model, loader, step=None, loss_fn=F.nll_loss, top5=False, tag="test") -> dict:
    """Mean loss and accuracy (top-1, and top-5 when asked) over the whole test set on all processes;
    logs the ``[Test]`` line, and TensorBoard's ``<tag>/loss``, ``<tag>/accuracy``... (``eval`` for a
    validation set). Returns ``{"loss", "accuracy", "correct", "total"[, "top5_accuracy"]}``."""
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
        {f"{tag}/{name}": value for name, value in results.items() if "accuracy" in name or name == "loss"}, step=step
    )
    return results


def finish(accelerator, model, progress, results: dict, *, output_dir, save_path=None) -> None:
    """The end of a run (its last checkpoint saved by ``train``): from rank 0 ``results.json`` in
    ``output_dir`` (``results`` and the step reached) and the trained weights at ``save_path`` (the
    flag ``--save-path``; None: not saved), then ``end_run``."""
    state_dict = accelerator.get_state_dict(model)  # on every rank: under DeepSpeed ZeRO-3 it gathers the shards
    if global_rank() == 0:
        # Strict JSON, which other tools read too: a diverged run's NaN or infinite loss becomes null.
        results = {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in results.items()
        }
        results["steps"] = progress.step
        rerun = "the last checkpoint holds the trained weights: rerun with --resume to write them again"
        with naming_a_failed_save(f"the results in {output_dir}", output_dir, rerun):
            atomic_write(
                Path(output_dir) / "results.json",
                lambda file: json.dump(results, file, indent=2, allow_nan=False),
                binary=False,
            )
        if save_path:
            with naming_a_failed_save(f"--save-path {save_path}", Path(save_path).parent, rerun):
                save_state_dict(state_dict, save_path)
            log(f"Weights saved to {save_path}")
    end_run(accelerator)


def end_run(accelerator) -> None:
    """Ends the trackers, the output folder's lock and, through ``launch.entry.run_main``, the process: a
    multi-process run ends it without the interpreter's finalization (``entry.end_without_finalization``;
    destroy_process_group cannot stop gloo's threads while the prepared model keeps the group)."""
    accelerator.end_training()
    release_output_dir_locks()
    if accelerator.num_processes > 1:
        end_without_finalization()
