import json

import pytest

from tests.benchmarks.conftest import run_quick
from tests.conftest import DATA, needs_data


@pytest.mark.slow
@pytest.mark.integration
@needs_data
def test_quick_accuracy_benchmark_runs_the_recipes(tmp_path):
    output = tmp_path / "accuracy_mnist.json"
    stdout = run_quick("accuracy_mnist.py", output, "--data-path", DATA, "--output-dir", tmp_path / "runs")
    assert "before finetune" in stdout
    figures = json.loads(output.read_text())
    (row,) = figures["rows"]
    assert row["method"] == "spatial" and row["policy"] == "ratio=0.3" and row["recipe"] == "mnist_online.py"
    assert row["flops"] < figures["baseline"]["flops"] and list(row["ranks"]) == ["conv2"]
    assert 0 <= row["accuracy_before"] <= 1 and 0 <= row["accuracy_finetuned"] <= 1
    assert output.with_suffix(".png").stat().st_size > 0
