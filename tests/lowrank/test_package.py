import os
import pathlib
import re
import subprocess
import sys

import pytest

import lowrank

LOWRANK_DIR = pathlib.Path(lowrank.__file__).parent


def test_lowrank_imports_neither_accelerate_nor_torch_distributed():
    # torch itself may load torch.distributed; the library's own modules must not ask for it.
    for source in LOWRANK_DIR.glob("*.py"):
        text = source.read_text()
        assert not re.search(r"^\s*(import|from)\s+(accelerate|torch\.distributed)\b", text, re.M), source
    # Nor torch.utils.benchmark, which brings torch.utils.cpp_extension and its CUDA_HOME warning along.
    wanted = "m.split('.')[0] in ('accelerate', 'launch') or m.startswith('torch.utils.cpp_extension')"
    code = f"import sys, lowrank; print(sorted(m for m in sys.modules if {wanted}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_log_level_from_the_environment():
    code = "import torch, lowrank; lowrank.auto_decomposition(torch.nn.Sequential(torch.nn.Linear(64, 64)))"
    env = dict(os.environ)
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    quiet = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "LOWRANK_LOG_LEVEL": "warning"},
    )
    assert "[lowrank] auto_decomposition start." in loud.stderr
    assert quiet.returncode == 0 and "[lowrank]" not in quiet.stderr


@pytest.mark.parametrize(
    "value, level, warning",
    [("", "INFO", None), (" WARN ", "WARNING", None), ("loud", "INFO", "LOWRANK_LOG_LEVEL: unknown log level 'loud'")],
)
def test_a_bad_or_empty_log_level_in_the_environment_does_not_stop_the_import(value, level, warning):
    code = "import logging, lowrank; print(logging.getLevelName(logging.getLogger('lowrank').level))"
    env = {**os.environ, "LOWRANK_LOG_LEVEL": value}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == level
    assert (warning in result.stderr) if warning else "[lowrank]" not in result.stderr
