import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_quick_benchmark_runs_and_saves_its_figures(tmp_path):
    output = tmp_path / "decompose_speed.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decompose_speed.py"), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "Targets" in result.stdout and "full rank spatial on Conv2d" in result.stdout
    figures = json.loads(output.read_text())
    assert figures  # machine description and measurements
