import json

import pytest

from tests.benchmarks.conftest import run_quick
from tests.conftest import DATA, needs_data


@pytest.mark.slow
@pytest.mark.integration
@needs_data
def test_quick_launch_overhead_times_every_mode_again_and_again(tmp_path):
    output = tmp_path / "launch_overhead.json"
    # Twice in the same folder: the second cold run must not find the first one's decomposition.
    for _ in range(2):
        stdout = run_quick("launch_overhead.py", output, "--data-path", DATA, "--output-dir", tmp_path / "runs")
        assert "online_cached" in stdout and "Targets" in stdout
        figures = json.loads(output.read_text())
        assert set(figures["first_step_s"]) == {"baseline", "offline", "online_cold", "online_cached"}
        assert all(len(times) == 1 and times[0] > 0 for times in figures["first_step_s"].values())
        assert output.with_suffix(".png").stat().st_size > 0
