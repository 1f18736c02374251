import json
import re

import pytest

from tests.benchmarks.conftest import run_quick

TIMED = re.compile(r"time|faster|RSS")  # the targets a busy or slow machine may miss


@pytest.mark.slow
@pytest.mark.integration
def test_quick_benchmark_runs_and_saves_its_figures(tmp_path):
    output = tmp_path / "decompose_speed.json"
    stdout = run_quick("decompose_speed.py", output, timeout=600)
    assert "Targets" in stdout and "full rank spatial on Conv2d" in stdout
    figures = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    # The targets that do not depend on the machine's speed hold, even at --quick's sizes.
    verdicts = {target: verdict for target, _, verdict in figures["targets"]}
    timing_free = {target: verdict for target, verdict in verdicts.items() if not TIMED.search(target)}
    assert {"svd", "spatial", "tucker2"} <= {
        target.split()[2] for target in timing_free if target.startswith("full rank")
    }
    assert any(target.startswith("spatial") for target in timing_free)
    assert any("tensorly" in target for target in timing_free)
    assert set(timing_free.values()) == {"PASS"}, timing_free
