import json

import pytest

from tests.benchmarks.conftest import run_quick


@pytest.mark.slow
@pytest.mark.integration
def test_quick_sweep_replays_every_model_bit_identically(tmp_path):
    output = tmp_path / "torchvision_sweep.json"
    stdout = run_quick("torchvision_sweep.py", output, timeout=600)
    assert "6 of 6 runs replay bit-identically" in stdout
    runs = json.loads(output.read_text())["models"]
    assert {(run["model"], run["rule"]) for run in runs} == {
        (model, rule) for model in ("resnet18", "mobilenet_v3_small", "squeezenet1_1") for rule in ("amct", "ratio")
    }
    assert all(run["identical"] for run in runs)
    assert all(run["layers"] > 0 for run in runs if run["rule"] == "ratio")
