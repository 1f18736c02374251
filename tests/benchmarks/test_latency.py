import json

import pytest

from tests.benchmarks.conftest import run_quick


@pytest.mark.slow
@pytest.mark.integration
def test_quick_latency_benchmark_prints_saves_and_plots(tmp_path):
    output = tmp_path / "latency.json"
    stdout = run_quick("latency.py", output, timeout=600)
    assert "latency ratio" in stdout and "spatial latency=0.7" in stdout
    figures = json.loads(output.read_text())
    assert figures["machine"]["torch_threads"] == 1
    rows = figures["rows"]
    assert {row["variant"] for row in rows} == {"dense", "spatial ratio=0.5", "spatial latency=0.7"}
    assert {row["batch"] for row in rows} == {1, 2}
    assert all(row["seconds"] > 0 and 0 < row["flops_ratio"] <= 1 for row in rows)
    assert (tmp_path / "latency_mnist_cpu_quick.png").stat().st_size > 0
