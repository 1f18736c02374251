"""README.md and docs/ say what the code does: the quick start runs and prints what README.md shows,
links resolve, the examples parse and replay, and every shell command is run, here or by a test named
in RUN_BY. A command added to the docs without a test fails ``test_command_is_run``."""

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank
from launch.mnist import Net
from lowrank.cli import main as lowrank_cli
from tests.conftest import ENV, ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 150

# The program or script a command runs -> the file that runs it (a test, or CI's script). The file
# must name it (its base name, or for CI's steps the text itself). Commands are matched in this order.
RUN_BY = {
    "python3 -m venv": ".ci/run",
    "pip install": ".ci/run",
    "-m pytest": ".ci/run",
    "recipes/mnist_train.py": "tests/recipes/test_mnist.py",
    "recipes/mnist_baseline.py": "tests/recipes/test_mnist.py",
    "recipes/mnist_online.py": "tests/recipes/test_mnist.py",
    "recipes/mnist_offline.py": "tests/recipes/test_mnist.py",
    "recipes/decompose_model.py": "tests/recipes/test_mnist.py",
    "recipes/compare_runs.py": "tests/recipes/test_mnist.py",
    "recipes/resnet50_imagenet.py": "tests/recipes/test_resnet50.py",
    "slurm/mnist_cpu.sbatch": "tests/slurm/test_slurm.py",
    "slurm/resnet50_gpu.sbatch": "tests/slurm/test_slurm.py",
    "slurm/decompose.sbatch": "tests/slurm/test_slurm.py",
    "slurm/submit_offline.sh": "tests/slurm/test_slurm.py",
    "slurm/local-cluster.sh": "tests/slurm/test_slurm.py",
    "benchmarks/accuracy_mnist.py": "tests/benchmarks/test_accuracy_mnist.py",
    "benchmarks/decompose_speed.py": "tests/benchmarks/test_decompose_speed.py",
    "benchmarks/dropin.py": "tests/benchmarks/test_dropin.py",
    "benchmarks/latency.py": "tests/benchmarks/test_latency.py",
    "benchmarks/launch_overhead.py": "tests/benchmarks/test_launch_overhead.py",
    "benchmarks/resnet50_throughput.py": "tests/benchmarks/test_resnet50_throughput.py",
    "benchmarks/quality.py": "tests/benchmarks/test_quality.py",
    "docs/diagram.py": "tests/test_docs.py",
}
# Commands that only set up the shell (the tests pass the same environment their own way).
ENVIRONMENT = (re.compile(r"source \.venv/bin/activate"), re.compile(r"export [A-Z_]+=\S+"))

# README.md's two commands, as they were on one line each: the multi-line versions must run the same.
MAIN_JOB = (
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 && .venv/bin/pip install -e . "
    "&& .venv/bin/accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_baseline.py "
    "--data-path ../shared/data --train-batch-size 128 --output-dir runs/baseline "
    "--save-path runs/baseline/baseline.pth "
    "&& .venv/bin/accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/mnist_online.py "
    "--data-path ../shared/data --train-batch-size 128 --pretrained-path runs/baseline/baseline.pth "
    "--output-dir runs/online --save-path runs/online/decomposed_finetuned.pth "
    "&& .venv/bin/python recipes/compare_runs.py runs/baseline runs/online"
)
TESTS = (
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 "
    '&& .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest'
)


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """The fenced blocks of a Markdown file, in order, as (language, body)."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", path.read_text(), re.S | re.M)


def prose(path: Path) -> str:
    """The file without its fenced blocks and inline code, where Markdown links live."""
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def block_after(blocks, index, language="text") -> str | None:
    """The body of the block right after ``blocks[index]`` when it is in ``language``."""
    if index + 1 < len(blocks) and blocks[index + 1][0] == language:
        return blocks[index + 1][1]
    return None


def commands(block: str) -> list[list[str]]:
    """The simple commands of a bash block, as words: lines joined where they continue, split at
    ``&&``, ``||``, ``;`` and ``|``, comments and leading variable assignments left out."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|", ";;"):
                current.append(word)
                continue
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0], re.S):
                current.pop(0)
            if current:
                found.append(current)
            current = []
    return found


@contextlib.contextmanager
def working_directory(path: Path):
    """``contextlib.chdir`` of Python 3.11."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def all_commands():
    """Every command of every bash block in README.md and docs/, with where it is and the text block
    that follows its block (its output, when the docs show it)."""
    found = []
    for page in PAGES:
        blocks = fenced_blocks(page)
        for index, (language, body) in enumerate(blocks):
            if language != "bash":
                continue
            found_here = commands(body)
            for number, words in enumerate(found_here):
                output = block_after(blocks, index) if len(found_here) == 1 else None
                marks = [pytest.mark.slow] if "--help" in words else []
                identifier = f"{page.relative_to(ROOT)}:{index}:{number}:{' '.join(words)[:60]}"
                found.append(pytest.param(page, words, output, id=identifier, marks=marks))
    return found


def run_by(words: list[str]) -> str | None:
    line = " ".join(words)
    return next((key for key in RUN_BY if key in line), None)


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """README.md's quick start, run in a fresh folder: the folder (with the info file it writes) and
    what it printed."""
    blocks = fenced_blocks(README)
    index = next(i for i, (language, _) in enumerate(blocks) if language == "python")
    folder = tmp_path_factory.mktemp("quick_start")
    printed = io.StringIO()
    with working_directory(folder), contextlib.redirect_stdout(printed), torch.random.fork_rng():
        exec(compile(blocks[index][1], str(README), "exec"), {"__name__": "__readme__"})
    return folder, printed.getvalue(), block_after(blocks, index)


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details to docs/"


def test_quick_start_prints_what_readme_shows(quick_start):
    _, printed, shown = quick_start
    assert shown is not None, "README.md shows the quick start's output in a ```text block right after it"
    assert printed == shown


def test_readme_commands_run_the_same_programs_as_before():
    """The two commands keep their programs, flags and paths, written on several lines."""
    blocks = [body for language, body in fenced_blocks(README) if language == "bash"]
    written = {tuple(shlex.split(body.replace("\\\n", " "))): body for body in blocks}
    for expected in (MAIN_JOB, TESTS):
        body = written.get(tuple(shlex.split(expected)))
        assert body is not None, f"README.md no longer runs: {expected}"
        assert body.count("\n") > 2, "each command is written on several lines"
    assert ".venv/bin/python -m pytest\n" in (ROOT / ".ci" / "run").read_text(), "CI runs README's test command"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_file(), f"{page.name}: link to {target}: no such file"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", prose(resolved), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
            assert anchor in slugs, f"{page.name}: link to {target}: no such heading in {resolved.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_bash_blocks_parse(page):
    for language, body in fenced_blocks(page):
        if language == "bash":
            result = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, f"{page.name}:\n{body}\n{result.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_examples_parse(page):
    for language, body in fenced_blocks(page):
        if language == "python":
            ast.parse(body, filename=str(page))


@pytest.mark.parametrize(("page", "words", "output"), all_commands())
def test_command_is_run(page, words, output, quick_start, capsys):
    """Each command is run here when cheap (``lowrank inspect``, ``--help``), or named in RUN_BY with
    the test that runs it."""
    line = " ".join(words)
    if any(pattern.fullmatch(line) for pattern in ENVIRONMENT):
        return
    if words[0] == "lowrank":  # on the info file the quick start wrote
        capsys.readouterr()
        with working_directory(quick_start[0]):
            assert lowrank_cli(words[1:]) == 0
        printed = capsys.readouterr().out
        if output is not None:
            assert [row.rstrip() for row in printed.splitlines()] == output.splitlines()
        return
    if "--help" in words:
        program = [sys.executable] if re.fullmatch(r"(\.venv/bin/)?python3?", words[0]) else []
        result = subprocess.run(
            [*program, *words[bool(program) :]], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300
        )
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
        return
    key = run_by(words)
    assert key, f"{page.name}: {line!r} is run by no test: run it in a test and add it to RUN_BY"
    runner = ROOT / RUN_BY[key]
    assert runner.is_file(), f"{RUN_BY[key]} does not exist"
    named = Path(key).name if "/" in key else key
    assert named in runner.read_text(), f"{RUN_BY[key]} does not run {named}"


def test_info_file_examples_replay_on_the_mnist_network(tmp_path):
    """docs/info-file.md's three examples are files that decompose_network reads, for the network it names."""
    examples = [body for language, body in fenced_blocks(DOCS / "info-file.md") if language == "json"]
    expected = [
        {"conv2": ["conv2.0", "conv2.1"]},  # lowrank's
        {"conv2": ["conv2.0", "conv2.1"]},  # AMCT's
        {"conv2": ["conv2.0", "conv2.1", "conv2.2"], "fc": ["fc.0", "fc.1"]},  # msModelSlim's
    ]
    assert len(examples) == len(expected)
    for number, (example, changes) in enumerate(zip(examples, expected)):
        path = tmp_path / f"example_{number}.json"
        path.write_text(json.dumps(json.loads(example)))
        assert lowrank.decompose_network(Net(), path)[1] == changes


def test_info_file_examples_are_what_lowrank_writes(tmp_path):
    """Each example in docs/info-file.md is what the call it names writes."""
    examples = [json.loads(body) for language, body in fenced_blocks(DOCS / "info-file.md") if language == "json"]
    torch.manual_seed(0)
    lowrank.auto_decomposition(Net(), tmp_path / "lowrank.json", method="spatial")
    lowrank.auto_decomposition(Net(), tmp_path / "amct.json")
    lowrank.Decompose(Net(), config_file=tmp_path / "msmodelslim.json").from_ratio(0.5, divisor=8)
    written = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("lowrank", "amct", "msmodelslim")]
    assert examples == written


def diagram_module():
    spec = importlib.util.spec_from_file_location("diagram", DOCS / "diagram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagram_figures_are_lowranks(tmp_path):
    """The layer in the picture: AMCT's rank and the factors' shapes, as lowrank computes them."""
    diagram = diagram_module()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(diagram.CHANNELS, diagram.CHANNELS, diagram.KERNEL))
    model, _ = lowrank.auto_decomposition(model)
    first, last = (factor.weight for factor in model[0])
    assert tuple(first.shape) == (diagram.RANK, diagram.CHANNELS, diagram.KERNEL, 1)
    assert tuple(last.shape) == (diagram.CHANNELS, diagram.RANK, 1, diagram.KERNEL)
    assert first.numel() == last.numel() == diagram.FACTOR_WEIGHTS
    assert diagram.DENSE_WEIGHTS == diagram.CHANNELS**2 * diagram.KERNEL**2


def test_diagram_draws_a_small_png(tmp_path):
    committed = DOCS / "images" / "overview.png"
    assert committed.is_file() and committed.stat().st_size < 200_000
    diagram_module().main(["--output", str(tmp_path / "overview.png")])
    assert (tmp_path / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
