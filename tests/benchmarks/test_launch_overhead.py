import json

import pytest

from tests.benchmarks.conftest import run_quick
from tests.conftest import needs_data


@pytest.mark.slow
@pytest.mark.integration
@needs_data
def test_quick_launch_overhead_times_every_mode(tmp_path, mnist_subset):
    output = tmp_path / "launch_overhead.json"
    # The script itself fails when a cold run finds a decomposition to reuse, or a cached one none.
    stdout = run_quick("launch_overhead.py", output, "--data-path", mnist_subset, "--output-dir", tmp_path / "runs")
    assert "online_cached" in stdout and "Targets" in stdout
    figures = json.loads(output.read_text())
    assert set(figures["first_step_s"]) == {"baseline", "offline", "online_cold", "online_cached"}
    assert all(len(times) == 1 and times[0] > 0 for times in figures["first_step_s"].values())
    assert output.with_suffix(".png").stat().st_size > 0
