import json

import pytest

from tests.benchmarks.conftest import run_quick


@pytest.mark.slow
@pytest.mark.integration
def test_quick_benchmark_runs_and_saves_its_figures(tmp_path):
    output = tmp_path / "decompose_speed.json"
    stdout = run_quick("decompose_speed.py", output, timeout=600)
    assert "Targets" in stdout and "full rank spatial on Conv2d" in stdout
    figures = json.loads(output.read_text())
    assert figures  # machine description and measurements
    assert output.with_suffix(".png").stat().st_size > 0
