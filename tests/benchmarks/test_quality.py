import json

import pytest

from tests.benchmarks.conftest import run_quick
from tests.conftest import needs_data

VARIANTS = ("uniform", "data-aware", "budget", "budget+sequential", "budget+distill")


@pytest.mark.slow
@pytest.mark.integration
@needs_data
def test_quick_quality_benchmark_measures_every_variant(tmp_path, mnist_subset):
    output = tmp_path / "quality.json"
    stdout = run_quick("quality.py", output, "--data-path", mnist_subset, "--output-dir", tmp_path / "runs")
    assert "Targets:" in stdout and "calibration adds at most 10%" in stdout
    figures = json.loads(output.read_text())
    assert list(figures["networks"]) == ["DeepNet"]
    for name, network in figures["networks"].items():
        variants = {(row["target"], row["variant"]) for row in network["rows"]}
        assert variants == {(0.15, variant) for variant in VARIANTS}
        for row in network["rows"]:
            assert row["flops_ratio"] <= row["target"], (name, row)
            assert 0 <= row["accuracy_before"] <= 1 and 0 <= row["accuracy_finetuned"] <= 1
        uniform, budget = (
            {row["target"]: row for row in network["rows"] if row["variant"] == v} for v in ("uniform", "budget")
        )
        for row in network["rows"]:
            same = {"data-aware": uniform, "budget+sequential": budget}.get(row["variant"])
            if same:  # the same ranks, fitted to the data (one after another)
                assert (
                    row["ranks"] == same[row["target"]]["ranks"] and row["layer_errors"].keys() == row["ranks"].keys()
                )
    assert figures["timing"]["mnist"]["with_s"] > 0
    assert output.with_suffix(".png").stat().st_size > 0
