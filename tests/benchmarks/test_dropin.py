import json

import pytest

from tests.benchmarks.conftest import run_quick


@pytest.mark.slow
@pytest.mark.integration
def test_quick_dropin_benchmark_meets_its_timing_free_targets(tmp_path):
    output = tmp_path / "dropin.json"
    # RegNetX-400MF: 39 layers msModelSlim decomposes in seconds (ResNet-18 takes it a minute); from_vbmf()
    # and AMCT's choice on ResNets are left to tests/lowrank (test_msmodelslim.py, test_amct.py).
    calls = ["--calls", "from_ratio(0.5)", "from_ratio(0.5), datasets"]
    stdout = run_quick("dropin.py", output, "--model", "regnet_x_400mf", *calls, timeout=900)
    assert "Targets" in stdout and "AMCT's choice on mnist_net: 1 layers" in stdout
    figures = json.loads(output.read_text())
    assert list(figures["msmodelslim"]) == ["from_ratio(0.5)", "from_ratio(0.5), datasets"]
    assert all(row["layers"] == 39 for row in figures["msmodelslim"].values())
    for call, row in figures["msmodelslim"].items():
        assert row["same_config"], call
        assert row["error_ratio"] <= 1.001, call  # no worse than msModelSlim's own
        assert row["lowrank"]["params"] == row["msmodelslim"]["params"], call
    assert figures["amct"]["mnist_net"]["ranks"] == {"conv2": 64}  # the AMCT sample's conv2
    assert output.with_suffix(".png").stat().st_size > 0
