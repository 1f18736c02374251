"""The MNIST recipes end to end, through their real launchers on CPU with a few steps."""

import json
import os
import re
import runpy
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.barrier import Artifacts
from launch.entry import RunError
from launch.mnist import Net
from lowrank.io import load_state_dict
from tests.conftest import (
    DATA,
    ENV,
    MNIST_SUBSET,
    RECIPES,
    ROOT,
    accelerate_launch,
    find_processes,
    free_port,
    idx_dataset,
    needs_data,
    needs_deepspeed,
    run,
    torchrun,
)

TEST_IMAGES = MNIST_SUBSET["t10k"]
# lowrank's data-aware budget, fitted layer after layer, which the online run below and the offline step 1 share.
CALIBRATED = ["--budget", "0.3", "--calibration-batches", "2", "--sequential-calibration"]


def scalars(run_dir):
    """Scalars of one TensorBoard run folder (the hyperparameters sit in a sub-run of their own)."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Tags()["scalars"], events


def test_recipes_is_not_a_package():
    assert not (RECIPES / "__init__.py").exists()


@pytest.mark.parametrize(
    "recipe,args,message",
    [
        ("mnist_online.py", [], "--pretrained-path is required in online mode"),
        ("mnist_offline.py", [], "--decompose-info-path is required in offline mode"),
        (
            "mnist_offline.py",
            ["--decompose-info-path", "x.json", "--decomposed-weights-path", "w.pth"],
            "--decompose-info-path x.json does not exist",
        ),
        ("mnist_online.py", ["--pretrained-path", "missing.pth"], "--pretrained-path missing.pth does not exist"),
        (
            "mnist_offline.py",
            ["--decompose-info-path", "x.json", "--decomposed-weights-path", "w.pth", "--vbmf"],
            "--vbmf: not used offline",
        ),
        ("mnist_baseline.py", ["--method", "tucker2"], "--method need(s) --tensor-decompose"),
    ],
)
def test_missing_paths_are_named_before_any_work(recipe, args, message):
    started = time.monotonic()
    result = run([sys.executable, str(RECIPES / recipe), *args], check=False, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "error: --backend nccl runs on GPUs: add --use-gpu, or use --backend gloo on the CPU"),
        (["--use-gpu"], "error: --backend nccl needs GPUs and torch sees none on this machine: use --backend gloo"),
    ],
)
def test_nccl_without_gpus_is_refused(flags, message, tmp_path):
    command = [sys.executable, str(RECIPES / "mnist_train.py"), "--backend", "nccl", *flags, "--output-dir", tmp_path]
    result = run(command, check=False, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert "[Train]" not in result.stdout


def amct_launch(*args, nproc=2):
    """The AMCT sample's command line: ``python -m torch.distributed.launch``, which passes
    ``--local-rank=N`` to the script (and warns that it is deprecated); a port of its own per test."""
    launch = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", str(nproc)]
    return [*launch, "--master_port", str(free_port()), *map(str, args)]


@pytest.mark.integration
@pytest.mark.slow
@needs_data
def test_the_amct_launcher_and_its_flags(tmp_path, few):
    """The sample's distributed flags, as its users write them: --backend, --init_method (here a tcp://
    rendezvous of its own) and --local_rank 0 after the launcher's --local-rank=N, on every rank."""
    out = tmp_path / "amct"
    init = f"tcp://127.0.0.1:{free_port()}"
    flags = ["--backend", "gloo", "--init_method", init, "--local_rank", "0", *few, "--steps", "2", "--log-steps", "1"]
    result = run(amct_launch(RECIPES / "mnist_train.py", *flags, "--output-dir", out), timeout=300)
    assert "torch.distributed.launch is deprecated" in result.stderr
    assert result.stdout.count("[Train] Step[2/2] Loss:") == 1 and result.stdout.count("[Test] Loss:") == 1
    assert f"/{TEST_IMAGES})" in result.stdout  # the whole test set, over both processes
    run_json = json.loads((out / "checkpoints" / "step_2" / "run.json").read_text())
    assert run_json["world_size"] == 2
    assert (run_json["backend"], run_json["init_method"]) == ("gloo", init)


@pytest.mark.integration
@needs_data
def test_the_init_method_is_the_process_groups(tmp_path, few):
    """--init-method reaches init_process_group: rank 0 cannot listen on a port another socket holds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        init = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        command = amct_launch(RECIPES / "mnist_train.py", *few, "--init-method", init, "--output-dir", tmp_path)
        result = run(command, check=False, timeout=300)
    assert result.returncode != 0 and "EADDRINUSE" in result.stderr
    assert "[Train]" not in result.stdout


def damaged_data(root):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    # A copy cut short (its header says 10,000 labels), and no .gz to unpack.
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 0x0801, 10000) + bytes(4992))
    return f"error: --data-path {root}: {raw / 't10k-labels-idx1-ubyte'} is incomplete (5000 bytes"


def test_a_damaged_data_copy_is_named_without_a_traceback(tmp_path):
    message = damaged_data(tmp_path)
    args = ["--data-path", tmp_path, "--output-dir", tmp_path / "out"]
    result = run([sys.executable, str(RECIPES / "mnist_baseline.py"), *args], check=False, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr


@pytest.mark.integration
def test_a_damaged_data_copy_stops_every_rank_with_its_message(tmp_path):
    message = damaged_data(tmp_path)
    command = torchrun(RECIPES / "mnist_baseline.py", "--data-path", tmp_path, "--output-dir", tmp_path / "out")
    result = run(command, check=False, timeout=300)
    assert result.returncode != 0 and result.stderr.count(message) == 2  # each rank, not a gloo error on rank 1
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr


@pytest.mark.integration
def test_another_dataset_in_mnists_idx_format_trains(tmp_path):
    idx_dataset(tmp_path / "data")
    args = ["--data-path", tmp_path / "data", "--steps", "2", "--log-steps", "1", "--train-batch-size", "16"]
    result = run([sys.executable, str(RECIPES / "mnist_baseline.py"), *args, "--output-dir", tmp_path / "out"])
    assert "[Train] Step[2/2] Loss:" in result.stdout
    assert re.search(r"^\[Test\] Loss: [\d.]+, Accuracy: [\d.]+% \(\d+/32\)$", result.stdout, re.M), result.stdout


@needs_data
def test_a_batch_larger_than_the_training_set_is_named(tmp_path):
    args = ["--data-path", DATA, "--train-batch-size", "60001", "--output-dir", tmp_path]
    result = run([sys.executable, str(RECIPES / "mnist_baseline.py"), *args], check=False, timeout=120)
    assert result.returncode != 0
    assert "--train-batch-size 60001 x 1 process(es) needs at least 60001 training samples" in result.stderr


@pytest.fixture(scope="module")
def online(tmp_path_factory, baseline, few):
    """An online run of ``few`` steps on two processes from ``baseline``, decomposed ``CALIBRATED``: its
    --output-dir (holding its decomposition and ``finetuned.pth``) and its output."""
    out = tmp_path_factory.mktemp("online")
    command = [RECIPES / "mnist_online.py", *few, *CALIBRATED, "--pretrained-path", baseline, "--output-dir", out]
    return out, run(accelerate_launch(*command, "--save-path", out / "finetuned.pth", port=free_port()))


@pytest.mark.integration
@needs_data
def test_online_on_two_processes(online, baseline):
    out, result = online
    log = result.stdout + result.stderr
    assert log.count("[lowrank] auto_decomposition start.") == 1  # rank 0 only
    assert log.count("[lowrank] decompose_network start.") == 1  # the other rank
    assert "[lowrank] Decompose: 'conv2' -> ['conv2.0', 'conv2.1']" in log
    assert result.stdout.count("[Train] Step[3/6] Loss:") == 1 and "[Test] Loss:" in result.stdout
    assert (
        "Accuracy:" in result.stdout and f"({TEST_IMAGES})" not in result.stdout and f"/{TEST_IMAGES})" in result.stdout
    )
    for name in (
        "decompose_info.json",
        "decomposed_weights.pth",
        "finetuned.pth",
        "checkpoints/step_6/model.safetensors",
    ):
        assert (out / name).is_file(), name
    tags, events = scalars(out / "mnist_online")
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/samples_per_s",
        "test/accuracy",
        "test/loss",
        "decomposition/flops_after",
    ):
        assert tag in tags, tag
    assert "train/task_loss" not in tags and "(task" not in result.stdout  # terms with --distill only
    assert [event.step for event in events.Scalars("train/loss")] == [3, 6]
    comparison = run([sys.executable, str(RECIPES / "compare_runs.py"), baseline.parent, out]).stdout
    row = next(line for line in comparison.splitlines() if line.startswith(str(out)))
    assert row.split()[1] == "online" and row.endswith("x") and float(row.split()[-1][:-1]) > 3.3  # FLOPs cut
    # --budget 0.3 and --calibration-batches 2: rank 0 alone read the first two training batches.
    assert "[Decompose] fitting the decomposition to 2 training batch(es) of 32" in result.stdout
    assert result.stdout.count("[Decompose] fitting") == 1
    policy = json.loads((out / "decompose_info.json").read_text())["policy"]
    assert policy["calibration"] == {**policy["calibration"], "batches": 2, "sequential": True}
    assert policy["rule"] == "budget=0.3"
    flops = json.loads((out / "results.json").read_text())["flops"]
    assert flops == policy["allocation"]["macs"] <= 0.3 * policy["allocation"]["dense_macs"]


def train_losses(stdout: str) -> list[tuple[str, str, str]]:
    """The loss of each ``[Train]`` line as printed, with its task and distillation terms ('' without)."""
    line = r"^\[Train\] Step\[\d+/\d+\] Loss: ([\d.]+)(?: \(task ([\d.]+), distill ([\d.]+)\))?, "
    return re.findall(line, stdout, re.M)


@pytest.mark.integration
@pytest.mark.slow
@needs_data
def test_distillation_at_alpha_one_is_the_plain_run_and_a_resume_distils_as_before(online, baseline, tmp_path, few):
    plain_out, plain = online
    out = tmp_path / "distill"
    command = [RECIPES / "mnist_online.py", *few, *CALIBRATED, "--pretrained-path", baseline, "--output-dir", out]
    distill = [*command, "--distill", "--distill-alpha", "1"]
    result = run(accelerate_launch(*distill, "--save-path", out / "finetuned.pth", port=free_port()))
    assert "[Distill] against the dense pretrained model: loss = 1 x task + 0 x T^2 x KL" in result.stdout
    losses = train_losses(result.stdout)
    assert [loss for loss, _, _ in losses] == [loss for loss, _, _ in train_losses(plain.stdout)] and len(losses) == 2
    assert all(task == loss and float(term) > 0 for loss, task, term in losses)
    weights, plain_weights = (torch.load(path / "finetuned.pth", weights_only=True) for path in (out, plain_out))
    assert weights.keys() == plain_weights.keys()
    for key, value in plain_weights.items():
        assert torch.equal(weights[key], value), key  # bit for bit
    tags, events = scalars(out / "mnist_online")
    assert [event.step for event in events.Scalars("train/distill_loss")] == [3, 6] and "train/task_loss" in tags

    # A resume distils and decomposes as the run it continues: other settings are refused before any work.
    changed = [*map(str, command), "--resume", "--distill", "--calibration-batches", "3"]
    other = run([sys.executable, *changed], check=False, timeout=120)
    assert other.returncode != 0 and "--distill-alpha 1.0 (now 0.5)" in other.stderr
    assert "--calibration-batches 2 (now 3)" in other.stderr
    resumed = run(accelerate_launch(*distill, "--steps", "8", "--resume", port=free_port()))
    assert f"[Resume] from {out / 'checkpoints' / 'step_6'} at step 6" in resumed.stdout
    assert re.search(r"^\[Train\] Step\[8/8\] Loss: [\d.]+ \(task [\d.]+, distill [\d.]+\), ", resumed.stdout, re.M)


@pytest.mark.integration
@needs_data
def test_offline_distillation_on_two_processes(online, baseline, tmp_path, few):
    """Offline, --pretrained-path is the teacher, which every rank reads; the student is the online run's
    decomposition, replayed."""
    decomposed = online[0]
    paths = ["--decompose-info-path", decomposed / "decompose_info.json"]
    paths += ["--decomposed-weights-path", decomposed / "decomposed_weights.pth"]
    command = [RECIPES / "mnist_offline.py", *few, *paths, "--pretrained-path", baseline, "--distill"]
    result = run(torchrun(*command, "--output-dir", tmp_path / "offline"))
    assert (result.stdout + result.stderr).count("[lowrank] decompose_network start.") == 2
    assert "[Distill] against the dense pretrained model: loss = 0.5 x task + 0.5 x T^2 x KL" in result.stdout
    losses = train_losses(result.stdout)
    assert len(losses) == 2 and "[Test] Loss:" in result.stdout
    for loss, task, distill in losses:
        assert float(distill) > 0 and float(loss) == pytest.approx((float(task) + float(distill)) / 2, abs=2e-6)


@pytest.mark.integration
@needs_data
def test_offline_two_steps(online, baseline, tmp_path, few, mnist_subset):
    """Step 1 with the online run's data-aware budget decomposes as the online run did."""
    out = tmp_path / "offline"
    paths = [
        "--decompose-info-path",
        out / "decompose_info.json",
        "--decomposed-weights-path",
        out / "decomposed_weights.pth",
    ]
    step1 = [RECIPES / "decompose_model.py", "--pretrained-path", baseline, *paths, *CALIBRATED]
    step1 = run([sys.executable, *map(str, step1), "--data-path", str(mnist_subset)])
    assert "Decomposition information file is saved to" in step1.stderr
    offline_info, online_info = (
        json.loads((folder / "decompose_info.json").read_text()) for folder in (out, online[0])
    )
    assert offline_info["policy"] == online_info["policy"]  # the same batches (sha256) and multiply-adds
    assert offline_info["layers"] == online_info["layers"]
    weights, online_weights = (load_state_dict(folder / "decomposed_weights.pth") for folder in (out, online[0]))
    for key, value in online_weights.items():  # other thread counts: equal up to rounding
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
    result = run(torchrun(RECIPES / "mnist_offline.py", *few, *paths, "--output-dir", out))
    log = result.stdout + result.stderr
    assert log.count("[lowrank] decompose_network start.") == 2 and "auto_decomposition start." not in log
    assert "[Test] Loss:" in result.stdout


@pytest.mark.integration
@needs_data
def test_decompose_model_writes_both_files_or_neither(baseline, tmp_path):
    info, weights = tmp_path / "decompose_info.json", tmp_path / "decomposed_weights.pth"
    info.write_text("earlier")
    (tmp_path / "file").write_text("")
    paths = ["--decompose-info-path", info, "--decomposed-weights-path", tmp_path / "file" / "weights.pth"]
    result = run(
        [sys.executable, str(RECIPES / "decompose_model.py"), "--pretrained-path", baseline, *paths], check=False
    )
    assert f"error: --decomposed-weights-path {tmp_path / 'file' / 'weights.pth'}: " in result.stderr
    assert result.returncode != 0 and info.read_text() == "earlier"

    # Stopped (a time limit, scancel) once the new info file is written: before the weights are saved,
    # the earlier info file comes back; once they are, the new pair stands.
    stopped_while_saving = f"""
import os, runpy, signal, sys, time
main = runpy.run_path({str(RECIPES / "decompose_model.py")!r})["main"]
save, when = main.__globals__["save_state_dict"], sys.argv.pop(1)
def save_state_dict(*args):
    if when == "after":
        save(*args)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
main.__globals__["save_state_dict"] = save_state_dict
main(main.__globals__["get_args_parser"]().parse_args(sys.argv[1:]))
"""
    paths = ["--decompose-info-path", info, "--decomposed-weights-path", weights]
    for when in ("before", "after"):
        command = [sys.executable, "-c", stopped_while_saving, when, "--pretrained-path", baseline, *paths]
        result = run(command, check=False)
        assert result.returncode == 128 + signal.SIGTERM, result.stderr
        if when == "before":
            assert info.read_text() == "earlier" and not weights.exists()
    assert json.loads(info.read_text())[0]["ori_layer_info"]["name"] == "conv2" and weights.is_file()  # AMCT's


@pytest.mark.parametrize(
    "model,saved,message",
    [
        ("resnet5", "state_dict", "--model resnet5 is neither 'mnist' nor one of torchvision's classifiers: alexnet,"),
        ("mnist", "whole_model", "pickles Python objects (launch.mnist.Net), which are not loaded because unpickling"),
        ("mnist", "checkpoint", "holds a training checkpoint ('model', 'epoch'), not a state dict"),
        (
            "resnet18",
            "state_dict",
            "does not fit the model: 119 keys missing (bn1.weight, bn1.bias, bn1.running_mean, ...); 3 keys unexpected",
        ),
        ("mnist", "ddp", "every key starts with 'module.': saved from a model wrapped in DistributedDataParallel?"),
    ],
)
def test_decompose_model_names_bad_inputs(model, saved, message, tmp_path, capsys):
    recipe = runpy.run_path(str(RECIPES / "decompose_model.py"))
    net = Net()
    weights = {
        "state_dict": net.state_dict(),
        "whole_model": net,
        "checkpoint": {"model": net.state_dict(), "epoch": 3},
        "ddp": {f"module.{name}": tensor for name, tensor in net.state_dict().items()},
    }[saved]
    torch.save(weights, tmp_path / "pretrained.pth")
    paths = ["--decompose-info-path", tmp_path / "info.json", "--decomposed-weights-path", tmp_path / "weights.pth"]
    args = ["--model", model, "--pretrained-path", tmp_path / "pretrained.pth", *paths]
    with pytest.raises(RunError) as error:
        recipe["main"](recipe["get_args_parser"]().parse_args(list(map(str, args))))
    assert message in str(error.value) and str(error.value).startswith("--")
    assert model == "resnet5" or f"(for --model {model}): " in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pretrained.pth"]  # nothing written


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--calibration-batches", "2"], "--calibration-batches: AMCT's choice, this recipe's decomposition"),
        (["--calibration-batches", "2", "--ratio", "0.3"], "--calibration-batches reads the training images of"),
        (["--calibration-batches", "2", "--ratio", "0.3", "--data-path", "{tmp}/none"], "--data-path: MNIST is not"),
    ],
)
def test_decompose_model_names_bad_calibration_flags(flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("offline")))
    recipe = runpy.run_path(str(RECIPES / "decompose_model.py"))
    torch.save(Net().state_dict(), tmp_path / "pretrained.pth")
    paths = ["--decompose-info-path", tmp_path / "info.json", "--decomposed-weights-path", tmp_path / "weights.pth"]
    args = ["--pretrained-path", tmp_path / "pretrained.pth", *paths, *(flag.format(tmp=tmp_path) for flag in flags)]
    with pytest.raises(RunError, match=re.escape(message)):
        recipe["main"](recipe["get_args_parser"]().parse_args(list(map(str, args))))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pretrained.pth"]  # nothing written


@pytest.mark.integration
@needs_data
def test_decompose_model_waits_for_another_job_writing_the_same_paths(baseline, tmp_path):
    info, weights = tmp_path / "decompose_info.json", tmp_path / "decomposed_weights.pth"
    command = [sys.executable, str(RECIPES / "decompose_model.py"), "--pretrained-path", str(baseline)]
    command += ["--decompose-info-path", str(info), "--decomposed-weights-path", str(weights)]
    waiting = f"waiting for {info}.lock: another job is writing these artifacts"
    with FileLock(Artifacts(info, weights).lock_path):  # held by another job (an online run, or step 1)
        job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
        output = read_until(job.stdout, waiting, timeout=300)
        assert job.poll() is None and not info.exists()
    output += job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    assert info.is_file() and weights.is_file()


@pytest.mark.integration
@needs_data
def test_rank_zero_failure_stops_every_rank(tmp_path, few):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"garbage")
    result = run(
        accelerate_launch(
            RECIPES / "mnist_online.py", *few, "--pretrained-path", corrupt, "--output-dir", tmp_path, port=free_port()
        ),
        check=False,
    )
    assert result.returncode != 0
    assert f"error: rank 0: --pretrained-path: cannot read weights file {corrupt}" in result.stderr
    assert (
        "rank 1: rank 0 failed to decompose the model: InputFileError: --pretrained-path: cannot read" in result.stderr
    )
    assert "lowrank/io.py" not in result.stderr  # an error message, not a traceback


def online_run(data, baseline, out, steps, *extra):
    """The arguments of an online run on ``data`` that logs every step and checkpoints into ``out``."""
    flags = ["--data-path", data, "--steps", steps, "--log-steps", "1", "--train-batch-size", "32"]
    flags += ["--test-batch-size", TEST_IMAGES, "--pretrained-path", baseline, "--output-dir", out]
    return [RECIPES / "mnist_online.py", *flags, *extra]


def start_in_own_session(command):
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT, start_new_session=True
    )


def read_until(stream, text: str, timeout: float) -> str:
    """The lines of ``stream`` up to the first that holds ``text``; fails after ``timeout`` s without it."""
    found, lines = threading.Event(), []

    def read():
        for line in stream:
            lines.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no {text!r} within {timeout} s:\n{''.join(lines)}"
    return "".join(lines)


def signal_at_step(process, step: int, signal_it) -> str:
    """Reads the job's output (started by ``start_in_own_session``) until rank 0 logs ``step``, calls
    ``signal_it()``, and returns the whole output once the job has ended."""
    try:
        output = read_until(process.stdout, f"[Train] Step[{step}/", timeout=300)
        signal_it()
        return output + process.communicate(timeout=300)[0]
    finally:
        if process.poll() is None:  # failed or timed out: nothing of the job outlives the test
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.integration
@needs_data
def test_preemption_saves_and_resume_continues(baseline, tmp_path, mnist_subset):
    out = tmp_path / "preempt"

    def args(steps, *extra):
        return online_run(mnist_subset, baseline, out, steps, *extra)

    process = start_in_own_session(accelerate_launch(*args(1000), port=free_port()))
    # As a scheduler signals the whole job step.
    log = signal_at_step(process, 3, lambda: os.killpg(process.pid, signal.SIGTERM))
    assert "[Preempted] SIGTERM: checkpoint saved to" in log, log
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    assert step >= 3

    resumed = run(accelerate_launch(*args(step + 3, "--resume"), port=free_port()))
    text = resumed.stdout + resumed.stderr
    assert f"[Resume] from {saved[0]} at step {step}" in text
    assert "auto_decomposition start." not in text  # the decomposition is reused, not redone
    assert "[Decompose] reused the decomposition of an earlier run with the same inputs" in text
    assert f"[Train] Step[{step + 1}/{step + 3}]" in text and "[Test] Loss:" in text

    # As after a crash past that checkpoint: the run resumes from it, named, and trains those steps
    # again; TensorBoard holds each step once, and the decomposition's scalars once.
    again = run(accelerate_launch(*args(step + 3, "--resume", saved[0]), port=free_port()))
    assert f"[Resume] from {saved[0]} at step {step}" in again.stdout + again.stderr
    _, events = scalars(out / "mnist_online")
    for tag in ("train/loss", "test/accuracy", "decomposition/params_after"):
        logged = [event.step for event in events.Scalars(tag)]
        assert logged and len(logged) == len(set(logged)), (tag, logged)

    # Another rank rule does not resume this run's checkpoint: named before any work.
    other = run(accelerate_launch(*args(step + 6, "--resume", "--ratio", "0.5"), port=free_port()), check=False)
    assert other.returncode != 0
    assert "was saved with other settings: --ratio not given (now 0.5)" in other.stderr
    assert "auto_decomposition start." not in other.stdout + other.stderr


@pytest.mark.integration
@needs_data
def test_one_rank_signalled_stops_every_rank_and_the_resumed_run_ends_as_an_uninterrupted_one(
    baseline, tmp_path, mnist_subset
):
    steps = 12
    run(accelerate_launch(*online_run(mnist_subset, baseline, tmp_path / "whole", steps), port=free_port()))

    out, port = tmp_path / "preempted", free_port()
    process = start_in_own_session(accelerate_launch(*online_run(mnist_subset, baseline, out, steps), port=port))

    def signal_rank_one():
        (pid,) = find_processes(
            "mnist_online.py", lambda env: (env.get("MASTER_PORT"), env.get("RANK")) == (str(port), "1")
        )
        os.kill(pid, signal.SIGTERM)

    log = signal_at_step(process, 3, signal_rank_one)
    # Rank 1 alone got the signal: the ranks agreed at the next step, and every one saved and exited 75.
    saved = re.search(r"\[Preempted\] signal on another rank: checkpoint saved to (\S+), exiting with 75", log)
    assert saved, log
    checkpoint = Path(saved[1])
    assert sorted(path.name for path in checkpoint.glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", log)) <= {"75"}, log
    assert int(checkpoint.name.split("_")[1]) < steps

    run(accelerate_launch(*online_run(mnist_subset, baseline, out, steps, "--resume"), port=free_port()))
    whole, resumed = (
        load_file(folder / "checkpoints" / f"step_{steps}" / "model.safetensors")
        for folder in (tmp_path / "whole", out)
    )
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key  # bit for bit


@pytest.mark.integration
@needs_data
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_online_under_deepspeed_zero(stage, baseline, tmp_path, few):
    """DeepSpeed on the CPU: Accelerate reports process_index 0 on every rank there, the runner must
    still give rank 0 alone the decomposition and the saving, and every rank its checkpoint shard."""
    out, config = tmp_path / "deepspeed", f"deepspeed_zero{stage}.yaml"
    command = [RECIPES / "mnist_online.py", *few, "--pretrained-path", baseline, "--output-dir", out]
    result = run(accelerate_launch(*command, "--save-path", out / "finetuned.pth", port=free_port(), config=config))
    log = result.stdout + result.stderr
    assert f"[Setup] 2 process(es) on cpu (gloo), mixed precision no, DeepSpeed ZeRO-{stage}\n" in result.stdout
    assert log.count("[lowrank] auto_decomposition start.") == 1 and log.count("decompose_network start.") == 1
    assert result.stdout.count("[Test] Loss:") == 1 and f"/{TEST_IMAGES})" in result.stdout  # the whole test set, once
    shards = sorted(path.name for path in (out / "checkpoints" / "step_6").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # each rank saved its optimizer shard
    results = json.loads((out / "results.json").read_text())
    assert results["params"] == 787_850  # counted before ZeRO-3 shards the parameters (AMCT: conv2 at rank 64)
    weights = torch.load(out / "finetuned.pth", weights_only=True)  # whole, also under ZeRO-3
    assert weights["conv2.0.weight"].shape[1:] == (128, 3, 1) and weights["fc.weight"].shape == (10, 73728)
    if stage == 2:
        resumed = run(accelerate_launch(*command, "--steps", "8", "--resume", port=free_port(), config=config))
        assert "at step 6" in resumed.stdout and "[Train] Step[8/8]" in resumed.stdout
