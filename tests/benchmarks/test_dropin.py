import json

import pytest

from tests.benchmarks.conftest import run_quick


@pytest.mark.slow
@pytest.mark.integration
def test_quick_dropin_benchmark_meets_its_timing_free_targets(tmp_path):
    output = tmp_path / "dropin.json"
    # from_vbmf() is left to tests/lowrank/test_msmodelslim.py: msModelSlim takes most of a minute on it.
    stdout = run_quick("dropin.py", output, "--calls", "from_ratio(0.5)", "from_ratio(0.5), datasets", timeout=900)
    assert "Targets" in stdout and "AMCT's choice on resnet18: 17 layers" in stdout
    figures = json.loads(output.read_text())
    assert list(figures["msmodelslim"]) == ["from_ratio(0.5)", "from_ratio(0.5), datasets"]
    for call, row in figures["msmodelslim"].items():
        assert row["same_config"], call
        assert row["error_ratio"] <= 1.001, call  # no worse than msModelSlim's own
        assert row["lowrank"]["params"] == row["msmodelslim"]["params"], call
    assert figures["amct"]["mnist_net"]["ranks"] == {"conv2": 64}  # the AMCT sample's conv2
    assert output.with_suffix(".png").stat().st_size > 0
