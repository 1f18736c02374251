import gzip
import importlib.util
import logging
import math
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from launch.mnist import Net

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
DATA = ROOT.parent / "shared" / "data"  # the MNIST copy beside the checkout (no download in tests)
IN_CI = os.environ.get("CI") == "true"


def missing_fixture(reason: str) -> None:
    """Skips the running test for want of something this machine lacks, except under CI=true, where it
    is an error: a CI run without the data, a package or the Slurm cluster must not pass untested."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a required fixture is missing, so this is an error, not a skip)")
    pytest.skip(reason)


def requires(missing: str | None):
    """Marks a test that needs a fixture of this machine: ``missing`` says what is absent (None when
    nothing is), and the test is then skipped or, under CI=true, failed (``missing_fixture``)."""
    return pytest.mark.requires(missing=missing)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        if mark.kwargs["missing"]:
            missing_fixture(mark.kwargs["missing"])


needs_data = requires(None if (DATA / "MNIST" / "raw").is_dir() else f"no MNIST copy at {DATA}")
needs_deepspeed = requires(None if importlib.util.find_spec("deepspeed") else "deepspeed is not installed")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LOWRANK_LOG_LEVEL": "info"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton, which a later Accelerator would take as it is:
    each test leaves none behind."""
    yield
    if "accelerate" in sys.modules:  # the lowrank tests never import it
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def lowrank_log():
    """Messages of the ``lowrank`` logger (it does not propagate, so caplog does not see them)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("lowrank")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def free_port():
    """A TCP port free right now on localhost, for accelerate launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc=2):
    """The command line of an ``nproc``-process torchrun job; ``--standalone`` rendezvous on localhost:0,
    so torchrun picks its own free port and concurrent jobs cannot race for one."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*command, *map(str, args)]


def accelerate_launch(*args, port, config="cpu_2proc.yaml", num_processes=None):
    """The command line of ``accelerate launch`` with a config of ``recipes/configs/`` (none when
    ``config`` is None: Accelerate's defaults), its process count overridden by ``num_processes``."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", str(CONFIGS / config)] if config else []
    launch += ["--num_processes", str(num_processes)] if num_processes else []
    return [*launch, "--main_process_port", str(port), *map(str, args)]


def run(command, timeout=600, check=True):
    """Runs a recipe's command line from the repository root; on failure, raises with its output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def find_processes(script: str, environment: Callable[[dict], bool]) -> list[int]:
    """The pids of the processes running ``script`` (in their command line) whose environment passes
    ``environment``: a job's training processes (``RANK`` set), told apart from their launcher."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline, environ = ((entry / name).read_bytes().split(b"\0") for name in ("cmdline", "environ"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        variables = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
        if any(script in part.decode(errors="replace") for part in cmdline) and environment(variables):
            found.append(int(entry.name))
    return found


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def idx(path, shape, data: bytes):
    """Writes an idx file of unsigned bytes: its header (magic number, sizes), then ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">{len(shape) + 1}I", 0x0800 + len(shape), *shape) + data)


# Images of the MNIST subset the recipe tests train and test on: a few steps of training read a few
# batches, and evaluating the whole test set (10,000 images) would take most of each run.
MNIST_SUBSET = {"train": 2048, "t10k": 500}


@pytest.fixture(scope="session")
def mnist_subset(tmp_path_factory) -> Path:
    """A data folder holding the first MNIST_SUBSET images of each split of the shared MNIST copy,
    under ``MNIST/raw`` as the recipes read it: real images, one session-wide copy."""
    source = DATA / "MNIST" / "raw"
    if not source.is_dir():
        missing_fixture(f"no MNIST copy at {DATA}")
    root = tmp_path_factory.mktemp("mnist_subset")
    for split, count in MNIST_SUBSET.items():
        for kind, dims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
            name = f"{split}-{kind}"
            plain = source / name
            data = plain.read_bytes() if plain.is_file() else gzip.decompress((source / f"{name}.gz").read_bytes())
            shape = struct.unpack(f">{dims}I", data[4 : 4 * (dims + 1)])
            start = 4 * (dims + 1)
            idx(root / "MNIST" / "raw" / name, (count, *shape[1:]), data[start : start + count * math.prod(shape[1:])])
    return root


def idx_dataset(root, train=96, test=32, size=(28, 28), seed=0):
    """A small dataset in MNIST's idx format under ``root/MNIST/raw``: random images and labels 0-9."""
    generator = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    for split, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, *size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=generator)
        idx(raw / f"{split}-images-idx3-ubyte", images.shape, images.numpy().tobytes())
        idx(raw / f"{split}-labels-idx1-ubyte", labels.shape, labels.numpy().tobytes())
    return raw


@pytest.fixture(scope="session")
def few(mnist_subset):
    """The flags of a short run on the MNIST subset; one test batch holds its whole test set."""
    test_images = MNIST_SUBSET["t10k"]
    flags = ["--steps", "6", "--log-steps", "3", "--train-batch-size", "32", "--test-batch-size", str(test_images)]
    return ["--data-path", str(mnist_subset), *flags]


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, few):
    """The MNIST baseline of ``few`` steps, one process: its weights, next to its results.json."""
    out = tmp_path_factory.mktemp("baseline")
    command = [sys.executable, str(RECIPES / "mnist_baseline.py"), *few, "--output-dir", out]
    result = run([*command, "--save-path", out / "baseline.pth"])
    assert "[Train] Step[6/6] Loss:" in result.stdout and "[Test] Loss:" in result.stdout
    return out / "baseline.pth"
