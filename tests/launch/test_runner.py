"""The runner's checkpoints and checks on one process (the multi-process runs are in
test_runner_processes.py and tests/recipes)."""

import itertools
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from filelock import FileLock
from safetensors import SafetensorError

import lowrank
from launch import accelerator as launch_accelerator
from launch import loop
from launch.checkpoints import Progress, checkpoint_to_resume, complete_checkpoints, load_checkpoint, save_checkpoint
from launch.distributed import node_name
from launch.entry import PREEMPTED_EXIT_CODE, RunError
from launch.loop import ShuffleByEpoch, batches, check_train_batches, shuffling_seed
from launch.model import prepare_model
from launch.preemption import Preemption, leave_signals_to_the_trainer
from lowrank.io import save_state_dict


def run_args(output_dir, **overrides):
    """A run's settings, as a recipe gives them to the checkpoint functions."""
    settings = {"output_dir": str(output_dir), "resume": True, "ratio": 0.3, "train_batch_size": 32, "seed": 1}
    return {**settings, **overrides}


@pytest.fixture
def trainer():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    return accelerator, model, progress


def test_a_checkpoint_is_complete_or_absent(trainer, tmp_path):
    accelerator, model, progress = trainer
    progress.step = 2
    path = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    assert path == tmp_path / "checkpoints" / "step_2" and (path / "run.json").is_file()
    assert json.loads((path / "run.json").read_text())["world_size"] == 1
    # What a process killed midway leaves, and stray names, are never resumed from.
    (tmp_path / "checkpoints" / "step_3").mkdir()  # no run.json: incomplete
    (tmp_path / "checkpoints" / ".step_4.partial").mkdir()
    (tmp_path / "checkpoints" / "step_2.bak").mkdir()
    assert complete_checkpoints(tmp_path) == [path]

    # Saving the same step again replaces it whole; the leftovers of a killed save go.
    (tmp_path / "checkpoints" / ".step_2.partial").mkdir()
    with torch.no_grad():
        model.weight.fill_(7.0)
    assert save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path)) == path
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".step_4.partial",
        "step_2",
        "step_2.bak",
        "step_3",
    ]
    with torch.no_grad():
        model.weight.zero_()
    progress.step = 0
    load_checkpoint(accelerator, path, progress)
    assert progress.step == 2 and bool((model.weight == 7.0).all())


def test_resume_needs_the_same_settings(trainer, tmp_path):
    accelerator, _, progress = trainer
    progress.step = 5
    saved = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    assert checkpoint_to_resume(run_args(tmp_path, steps=10), world_size=1) == saved  # --steps may change
    with pytest.raises(
        RunError,
        match=r"saved with other settings: --ratio 0.3 \(now 0.5\), the number of "
        r"processes 1 \(now 2\)",
    ):
        checkpoint_to_resume(run_args(tmp_path, ratio=0.5), world_size=2)
    # The optimizer's state, restored on a resume, holds the learning rate: a new one would not be used.
    save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path, lr=0.1))
    with pytest.raises(RunError, match=r"--lr 0.1 \(now 0.5\)"):
        checkpoint_to_resume(run_args(tmp_path, lr=0.5), world_size=1)
    # Saved before --divisor existed: its ranks were not rounded, and rounded ones would not fit them.
    run_json = saved / "run.json"
    run_json.write_text(
        json.dumps({key: value for key, value in json.loads(run_json.read_text()).items() if key != "divisor"})
    )
    with pytest.raises(RunError, match=r"--divisor 1 \(now 8\)"):
        checkpoint_to_resume(run_args(tmp_path, lr=0.1, divisor=8), world_size=1)
    assert checkpoint_to_resume(run_args(tmp_path, lr=0.1, divisor=1), world_size=1) == saved
    assert checkpoint_to_resume(run_args(tmp_path / "empty"), world_size=1) is None


def test_a_resume_distils_as_the_run_it_continues(trainer, tmp_path):
    accelerator, _, progress = trainer
    progress.step = 5
    distilling = {"distill": True, "distill_alpha": 0.5, "distill_temperature": 4.0}
    saved = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path, **distilling))
    assert checkpoint_to_resume(run_args(tmp_path, **distilling), world_size=1) == saved
    with pytest.raises(RunError, match=r"saved with other settings: --distill-alpha 0.5 \(now 0.7\)\."):
        checkpoint_to_resume(run_args(tmp_path, **distilling | {"distill_alpha": 0.7}), world_size=1)
    plain = {"distill": False, "distill_alpha": None, "distill_temperature": None}
    assert checkpoint_to_resume(run_args(tmp_path, test_only=True, **plain), world_size=1) == saved  # same model
    # Saved before --distill existed: trained on the task loss alone, as a run without --distill continues it.
    run_json = saved / "run.json"
    old = {key: value for key, value in json.loads(run_json.read_text()).items() if not key.startswith("distill")}
    run_json.write_text(json.dumps(old))
    assert checkpoint_to_resume(run_args(tmp_path, **plain), world_size=1) == saved
    with pytest.raises(RunError, match=r"saved with other settings: --distill False \(now True\)\."):
        checkpoint_to_resume(run_args(tmp_path, **distilling), world_size=1)


def test_a_resume_keeps_the_recipes_settings_and_an_evaluation_only_the_models(trainer, tmp_path):
    accelerator, _, progress = trainer
    progress.step = 5
    saved = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path, epochs=2, lr=0.1))
    # A recipe's learning-rate schedule: a resumed scheduler keeps its step, and would switch curves.
    with pytest.raises(RunError, match=r"saved with other settings: --epochs 2 \(now 3\)"):
        checkpoint_to_resume(run_args(tmp_path, epochs=3, lr=0.1), world_size=1, recipe_settings=("epochs",))
    # An evaluation depends on the model's structure alone, not on the training's settings.
    evaluation = run_args(tmp_path, epochs=3, lr=0.5, test_only=True)
    assert checkpoint_to_resume(evaluation, world_size=2, recipe_settings=("epochs",)) == saved
    with pytest.raises(RunError, match=r"saved with other settings: --ratio 0.3 \(now 0.5\)\."):
        checkpoint_to_resume(run_args(tmp_path, ratio=0.5, lr=0.5, test_only=True), world_size=2)


def test_a_deepspeed_checkpoint_resumes_under_deepspeed_with_as_many_processes(trainer, tmp_path, monkeypatch):
    accelerator, _, progress = trainer
    progress.step = 5
    saved = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as accelerate launch --use_deepspeed sets it
    for evaluating in (False, True):
        with pytest.raises(RunError, match=r"saved with other settings: the launcher's DeepSpeed off \(now on\)\."):
            checkpoint_to_resume(run_args(tmp_path, test_only=evaluating), world_size=1)
    saved = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    # Its ZeRO shards are per process: an evaluation too needs as many.
    with pytest.raises(RunError, match=r"the number of processes 1 \(now 2\)"):
        checkpoint_to_resume(run_args(tmp_path, test_only=True), world_size=2)
    assert checkpoint_to_resume(run_args(tmp_path, test_only=True), world_size=1) == saved
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(RunError, match=r"DeepSpeed on \(now off\)"):
        checkpoint_to_resume(run_args(tmp_path), world_size=1)
    # Saved before run.json recorded the launcher: told by DeepSpeed's model folder.
    run_json = saved / "run.json"
    run_json.write_text(
        json.dumps({key: value for key, value in json.loads(run_json.read_text()).items() if key != "deepspeed"})
    )
    (saved / "pytorch_model").mkdir()
    with pytest.raises(RunError, match=r"DeepSpeed on \(now off\)"):
        checkpoint_to_resume(run_args(tmp_path), world_size=1)


def test_a_deepspeed_checkpoint_resumes_under_the_same_zero_stage(trainer, tmp_path, monkeypatch):
    accelerator, _, progress = trainer
    progress.step = 5
    # As accelerate launch sets them for deepspeed_zero2.yaml.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    saved = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    # Named before any work, not by DeepSpeed's bare AssertionError once the model is built.
    for evaluating in (False, True):
        with pytest.raises(RunError, match=r"saved with other settings: DeepSpeed's ZeRO stage 2 \(now 3\)\."):
            checkpoint_to_resume(run_args(tmp_path, test_only=evaluating), world_size=1)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert checkpoint_to_resume(run_args(tmp_path), world_size=1) == saved


def test_an_evaluation_leaves_the_checkpoints_of_a_running_job_alone(trainer, tmp_path):
    accelerator, _, progress = trainer
    progress.step = 2
    step_2 = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    # The running job is saving step 4, and saving step 3 again: it has set the earlier one aside.
    partial, replaced = tmp_path / "checkpoints" / ".step_4.partial", tmp_path / "checkpoints" / ".step_3.replaced"
    partial.mkdir()
    shutil.copytree(step_2, replaced)
    with FileLock(tmp_path / ".lock"):
        assert checkpoint_to_resume(run_args(tmp_path, test_only=True), world_size=1) == step_2
    assert partial.is_dir() and replaced.is_dir() and not replaced.with_name("step_3").exists()


def test_the_newest_checkpoints_stay_and_a_named_one_resumes(trainer, tmp_path):
    accelerator, _, progress = trainer
    folder = tmp_path / "checkpoints"
    for step in range(1, 6):
        progress.step = step
        save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path, keep_last=2))
    assert complete_checkpoints(tmp_path) == [folder / "step_5", folder / "step_4"]
    assert checkpoint_to_resume(run_args(tmp_path, resume=str(folder / "step_4")), world_size=1) == folder / "step_4"
    with pytest.raises(RunError, match="--resume .*step_1: not a complete checkpoint"):
        checkpoint_to_resume(run_args(tmp_path, resume=str(folder / "step_1")), world_size=1)
    with pytest.raises(RunError, match=r"step_4 was saved with other settings: --ratio 0.3 \(now 0.5\)"):
        checkpoint_to_resume(run_args(tmp_path, resume=str(folder / "step_4"), ratio=0.5), world_size=1)
    # Resumed from step 2 (after step 4 and 5 were saved): the checkpoint it saves is the newest.
    progress.step = 3
    save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path, keep_last=1))
    assert complete_checkpoints(tmp_path) == [folder / "step_3"]


def test_earlier_runs_beyond_keep_runs_are_removed(trainer, tmp_path):
    accelerator, _, progress = trainer
    for day in range(1, 4):
        (tmp_path / f"checkpoints.2026010{day}-000000" / "step_1").mkdir(parents=True)
    save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    assert checkpoint_to_resume(run_args(tmp_path, resume=False, keep_runs=2), world_size=1) is None
    kept = sorted(path.name for path in tmp_path.glob("checkpoints.*"))
    assert len(kept) == 2 and kept[0] == "checkpoints.20260103-000000"  # and the run just set aside


def test_a_fresh_run_moves_the_earlier_checkpoints_aside(trainer, tmp_path, capsys):
    accelerator, _, progress = trainer
    progress.step = 5
    save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    (tmp_path / "results.json").write_text("{}")
    assert checkpoint_to_resume(run_args(tmp_path, resume=False, test_only=True), world_size=1) is None
    assert complete_checkpoints(tmp_path)  # evaluating only leaves them
    assert checkpoint_to_resume(run_args(tmp_path, resume=False), world_size=1) is None
    assert complete_checkpoints(tmp_path) == []
    (aside,) = tmp_path.glob("checkpoints.*")
    assert (aside / "step_5" / "run.json").is_file()  # moved, never deleted
    assert (aside / "results.json").is_file() and not (tmp_path / "results.json").exists()  # not this run's
    # --resume, after a run that forgot it, names where the checkpoints went
    assert checkpoint_to_resume(run_args(tmp_path), world_size=1) is None
    assert f"moved earlier checkpoints to {aside.name}: move one back" in capsys.readouterr().out


def test_a_damaged_checkpoint_gives_way_to_the_one_before(trainer, tmp_path, capsys):
    accelerator, _, progress = trainer
    for progress.step in (2, 4, 6, 8):
        save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    step_2, step_4, step_6, step_8 = (tmp_path / "checkpoints" / f"step_{step}" for step in (2, 4, 6, 8))
    (step_8 / "run.json").write_text('{"files": []}')  # written by something else
    (step_6 / "run.json").write_text("{")  # cut short
    weights = next(step_4.glob("model*"))
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated: a full disk, a copy cut short
    assert checkpoint_to_resume(run_args(tmp_path), world_size=1) == step_2
    out = capsys.readouterr().out
    assert f"{step_8} is damaged (run.json is not the JSON object a checkpoint saves)" in out
    assert f"{step_6} is damaged (run.json cannot be read" in out
    assert f"{step_4} is damaged ({weights.name} has" in out


def test_a_second_job_on_the_same_output_dir_is_refused(trainer, tmp_path):
    running_there = FileLock(tmp_path / ".lock")  # held by a job still running there
    with running_there, pytest.raises(RunError, match=f"another job is using --output-dir {tmp_path}"):
        checkpoint_to_resume(run_args(tmp_path), world_size=1)
    assert checkpoint_to_resume(run_args(tmp_path), world_size=1) is None  # once it has ended
    loop.end_run(trainer[0])  # this run ends: the next one may start there
    with FileLock(tmp_path / ".lock").acquire(timeout=0):
        pass


def test_a_failed_save_is_named_and_leaves_no_partial_checkpoint(trainer, tmp_path, monkeypatch):
    accelerator, _, progress = trainer

    def disk_full(folder):  # safetensors' error on a full disk (torch.save raises RuntimeError)
        os.makedirs(folder)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(RunError, match=r"could not save the checkpoint .*step_0: SafetensorError: .* GiB free on"):
        save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == []


def test_a_signal_during_the_last_save_exits_once_the_checkpoint_is_complete(trainer, tmp_path, monkeypatch):
    accelerator, model, progress = trainer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(4, 3), torch.randn(4, 2))] * 3
    save = loop.save_checkpoint

    def signalled_while_saving(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # a time limit, in the middle of the write
        return save(*args)

    monkeypatch.setattr(loop, "save_checkpoint", signalled_while_saving)
    handlers = {signum: signal.getsignal(signum) for signum in Preemption.SIGNALS}
    try:
        loop.preemption.install()
        with pytest.raises(SystemExit) as stopped:
            loop.train(
                accelerator, model, optimizer, loader, progress, steps=2, log_steps=1, output_dir=tmp_path,
                settings=run_args(tmp_path), loss_fn=torch.nn.functional.mse_loss,
            )  # fmt: skip
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_2"]


def test_a_save_killed_between_its_renames_leaves_the_earlier_checkpoint(trainer, tmp_path):
    accelerator, _, progress = trainer
    progress.step = 4
    path = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    path.rename(path.with_name(".step_4.replaced"))  # killed after setting it aside, before the new one came
    path.with_name(".step_4.partial").mkdir()
    assert checkpoint_to_resume(run_args(tmp_path), world_size=1) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_4"]


def test_checkpoints_of_the_previous_release_resume(trainer, tmp_path):
    accelerator, _, progress = trainer
    progress.step = 3
    path = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    (path / "run.json").rename(path / "args.json")  # what the previous release wrote
    assert checkpoint_to_resume(run_args(tmp_path), world_size=1) == path


def test_a_training_set_without_a_full_batch_per_process_is_named():
    check_train_batches(64, 32, 2)
    with pytest.raises(
        RunError,
        match="--train-batch-size 32 x 2 process\\(es\\) needs at least 64 training samples; the training set has 63",
    ):
        check_train_batches(63, 32, 2)


def test_a_resumed_run_sees_the_batches_the_uninterrupted_one_would_have():
    accelerator = Accelerator(cpu=True)
    dataset = torch.utils.data.TensorDataset(torch.arange(10))

    def loader():
        sampler = ShuffleByEpoch(dataset, seed=3)
        return accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler))

    def take(start, count):
        return [batch[0].tolist() for batch in itertools.islice(batches(accelerator, loader(), start), count)]

    uninterrupted = take(0, 13)  # 5 batches an epoch: into the third epoch
    assert take(7, 6) == uninterrupted[7:]  # resumed in the second epoch
    epochs = [sorted(sum(uninterrupted[i : i + 5], [])) for i in (0, 5)]
    assert epochs == [list(range(10))] * 2 and uninterrupted[:5] != uninterrupted[5:10]
    # Epoch 0 is a RandomSampler's order under the same seed (the MNIST recipe's results stay the same).
    order = list(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(3)))
    assert sum(uninterrupted[:5], []) == order


def test_the_shuffling_seed_gives_the_first_epoch_of_a_shuffled_dataloader():
    # The AMCT sample's loader: torch.manual_seed, then the model (any RNG use), then shuffle=True.
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    torch.manual_seed(5)
    torch.randn(7)
    plain = [batch[0].tolist() for batch in torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)]
    torch.manual_seed(5)
    torch.randn(7)
    sampler = ShuffleByEpoch(dataset, seed=shuffling_seed())
    assert [batch[0].tolist() for batch in torch.utils.data.DataLoader(dataset, batch_size=5, sampler=sampler)] == plain


def test_a_signal_waits_for_the_step_boundary_in_training_and_stops_the_process_elsewhere():
    handlers = {signum: signal.getsignal(signum) for signum in Preemption.SIGNALS}
    try:
        preemption = Preemption()
        preemption.install()
        with preemption.recorded():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preemption.received == "SIGUSR1"  # remembered, acted on at the next step
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. during the decomposition or an evaluation
        assert stopped.value.code == PREEMPTED_EXIT_CODE
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


class SlowRange(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        time.sleep(0.05)
        return index


@pytest.mark.parametrize("signum", Preemption.SIGNALS)
def test_data_loader_workers_outlive_preemption_signals(signum):
    # A launcher or Slurm signals every process of the job: the workers must keep serving batches
    # while the training process saves its checkpoint.
    loader = torch.utils.data.DataLoader(SlowRange(), num_workers=1, worker_init_fn=leave_signals_to_the_trainer)
    iterator = iter(loader)
    first = next(iterator)  # the worker has run its init function
    os.kill(iterator._workers[0].pid, signum)
    time.sleep(0.2)
    assert [int(batch) for batch in [first, *iterator]] == list(range(6))


def test_the_throughput_leaves_out_checkpoints_and_evaluations(trainer, tmp_path, monkeypatch, capsys):
    # A clock that only the test moves: each training step takes 1 s, each save and evaluation 100 s.
    accelerator, model, progress = trainer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(4, 3), torch.randn(4, 2))] * 4
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    save = loop.save_checkpoint

    def taking(seconds, action):
        def timed(*args):
            clock[0] += seconds
            return action(*args)

        return timed

    monkeypatch.setattr(loop, "save_checkpoint", taking(100, save))
    monkeypatch.setattr(loop, "preemption", Preemption())  # no signal left from another test
    loop.train(
        accelerator, model, optimizer, loader, progress, steps=4, log_steps=2, output_dir=tmp_path,
        settings=run_args(tmp_path), loss_fn=taking(1, torch.nn.functional.mse_loss), checkpoint_steps=1, eval_steps=1,
        eval_fn=taking(100, lambda: None), throughput_unit="samples/s",
    )  # fmt: skip
    lines = re.findall(r"^\[Train\] Step\[\d/4\] Loss: [\d.]+, (.*)$", capsys.readouterr().out, re.M)
    # 8 samples in 2 s of steps a log line; with the 200 s of saving and evaluating after step 1 (and 3),
    # 8 / 202 s. The time left counts the training steps alone too: 1 s each.
    assert lines == ["4.0 samples/s, lr 0.1, 0:00:02 left", "4.0 samples/s, lr 0.1, 0:00:00 left"]


def test_a_resume_past_the_last_step_says_there_is_nothing_to_train(trainer, tmp_path, capsys):
    accelerator, model, progress = trainer
    progress.step = 6  # a checkpoint of a run with more steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(4, 3), torch.randn(4, 2))]
    loop.train(
        accelerator, model, optimizer, loader, progress, steps=3, log_steps=1, output_dir=tmp_path,
        settings=run_args(tmp_path), loss_fn=torch.nn.functional.mse_loss,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "[Train] already at step 6 of 3: nothing to train" in out and "first step" not in out
    assert progress.step == 6 and not (tmp_path / "checkpoints").exists()


def test_a_launcher_overriding_the_gradient_accumulation_is_refused(tmp_path, monkeypatch):
    # What accelerate launch exports for gradient_accumulation_steps in its config: Accelerate prefers it.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(
        RunError,
        match=r"the launcher sets gradient accumulation to 1 step\(s\), which Accelerate would use instead of the "
        r"recipe's 2 \(--gradient-accumulation-steps",
    ):
        launch_accelerator.create_accelerator(use_gpu=False, output_dir=tmp_path, gradient_accumulation_steps=2)


def test_a_setting_accelerate_refuses_is_named_without_a_traceback(tmp_path, monkeypatch):
    def refuse(**kwargs):  # as on a GPU without bf16
        raise ValueError("bf16 mixed precision requires PyTorch >= 1.10 and a supported device.")

    monkeypatch.setattr(launch_accelerator, "Accelerator", refuse)
    with pytest.raises(RunError, match=r"bf16 mixed precision requires .* \(from the recipe's flags or"):
        launch_accelerator.create_accelerator(use_gpu=False, output_dir=tmp_path)


@pytest.mark.parametrize("gpus", [0, 2], ids=["cpu-only", "gpus"])
def test_gpus_left_unused_are_said_and_a_cpu_only_machine_hears_nothing(tmp_path, monkeypatch, capsys, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    accelerator = launch_accelerator.create_accelerator(use_gpu=False, output_dir=tmp_path)
    assert accelerator.device.type == "cpu"
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    unused = "[Setup] warning: this machine's 2 GPU(s) are not used: the run is on the CPU"
    assert warnings == ([unused] if gpus else [])


def test_fp16_on_the_cpu_is_refused(tmp_path, monkeypatch):
    """Accelerate autocasts to fp16 on GPUs only: the run would train in float32 without a word."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as accelerate launch --mixed_precision fp16 sets it
    with pytest.raises(RunError, match=r"mixed precision fp16 .* runs on GPUs only, and this run is on"):
        launch_accelerator.create_accelerator(use_gpu=False, output_dir=tmp_path)


def test_an_init_method_on_the_launchers_own_port_is_refused(tmp_path, monkeypatch):
    # What torchrun exports; its agent's store listens on MASTER_ADDR:MASTER_PORT.
    launcher = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunError, match=r"--init-method tcp://127.0.0.1:29511: the launcher already listens there"):
        launch_accelerator.create_accelerator(use_gpu=False, output_dir=tmp_path, init_method="tcp://127.0.0.1:29511")


def test_a_checkpoint_of_another_model_is_named(trainer, tmp_path):
    accelerator, _, progress = trainer
    path = save_checkpoint(accelerator, tmp_path, progress, run_args(tmp_path))
    other = Accelerator(cpu=True)
    other.prepare(torch.nn.Linear(5, 2))
    with pytest.raises(RunError, match=f"{path} does not fit the model built now"):
        load_checkpoint(other, path, Progress())


def test_pretrained_weights_of_another_model_are_named(tmp_path):
    weights = tmp_path / "other.pth"
    save_state_dict(torch.nn.Linear(5, 2).state_dict(), weights)
    with pytest.raises(
        RunError,
        match=f"rank 0: --pretrained-path: {weights} does not fit the model: "
        r"1 key of another shape \(weight 2x5 \(model: 2x3\)\)$",
    ):
        prepare_model(torch.nn.Linear(3, 2), "baseline", pretrained_path=weights)


def test_damaged_pretrained_weights_are_named_and_nothing_is_written(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    info, weights = tmp_path / "out" / "decompose_info.json", tmp_path / "out" / "decomposed_weights.pth"
    with pytest.raises(RunError, match=f"rank 0: --pretrained-path: cannot read weights file {garbage}"):
        prepare_model(
            torch.nn.Sequential(torch.nn.Linear(64, 64)), "online", pretrained_path=garbage, info_path=info,
            weights_path=weights, policy={"ratio": 0.3},
        )  # fmt: skip
    assert not info.exists() and not weights.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("info_garbage", "--decompose-info-path: {info}: malformed JSON"),
        ("weights_truncated", "--decomposed-weights-path: cannot read weights file {weights} \\(truncated"),
        ("weights_dense", "--decomposed-weights-path {weights} does not fit the structure of --decompose-info-path"),
    ],
)
def test_damaged_offline_files_are_named_by_their_flag(tmp_path, damage, message):
    info, weights = tmp_path / "decompose_info.json", tmp_path / "decomposed_weights.pth"
    decomposed, _ = lowrank.auto_decomposition(torch.nn.Sequential(torch.nn.Linear(64, 64)), info, ratio=0.3)
    save_state_dict(decomposed.state_dict(), weights)
    if damage == "info_garbage":
        info.write_text("{not json")
    elif damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        save_state_dict(torch.nn.Sequential(torch.nn.Linear(64, 64)).state_dict(), weights)
    message = message.format(info=info, weights=weights)
    with pytest.raises(RunError, match=f"rank 0 on {node_name()}: {message}"):
        prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "offline", info_path=info, weights_path=weights)


def test_a_full_disk_at_the_end_is_named(trainer, tmp_path, monkeypatch):
    accelerator, model, progress = trainer

    def disk_full(state_dict, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 596928 vs 596880")

    monkeypatch.setattr(loop, "save_state_dict", disk_full)
    save_path = str(tmp_path / "weights.pth")
    with pytest.raises(RunError, match=f"could not save --save-path {save_path}: RuntimeError: .* GiB free") as error:
        loop.finish(accelerator, model, progress, {}, output_dir=tmp_path, save_path=save_path)
    assert str(error.value).endswith(
        "the last checkpoint holds the trained weights: rerun with --resume to write them again"
    )


def test_a_diverged_runs_results_are_strict_json(trainer, tmp_path):
    """A NaN or infinite loss is written as null: Python's json would write NaN, which other JSON readers refuse."""
    accelerator, model, progress = trainer
    results = {"loss": math.nan, "top5": math.inf, "accuracy": 0.1}
    loop.finish(accelerator, model, progress, results, output_dir=tmp_path)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert results == {"loss": None, "top5": None, "accuracy": 0.1, "steps": 0}
