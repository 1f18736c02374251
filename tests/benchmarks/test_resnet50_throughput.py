import json
import subprocess
import sys

import pytest

from tests.conftest import ENV, ROOT


@pytest.mark.integration
@pytest.mark.slow
def test_quick_run_measures_the_variants_asked_for(tmp_path):
    output = tmp_path / "throughput.json"
    command = [sys.executable, "benchmarks/resnet50_throughput.py", "--quick", "--output", str(output)]
    command += ["--variants", "spatial 0.3", "spatial 0.3 /8"]  # tucker2's are the same recipe with --method
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = json.loads(output.read_text())["runs"]
    assert list(runs) == ["dense", "spatial 0.3", "spatial 0.3 /8"]
    assert all(run["images_per_s"] > 0 and len(run["windows"]) == 3 for run in runs.values())
    assert all(run["model_step_images_per_s"] > 0 for run in runs.values())
    assert runs["spatial 0.3"]["flops"] < runs["dense"]["flops"] and output.with_suffix(".png").is_file()
    # --divisor reached the recipe: rounding the ranks down to multiples of 8 cuts more.
    assert runs["spatial 0.3 /8"]["params"] < runs["spatial 0.3"]["params"]
    assert "ResNet-50 training throughput (CPU, float32" in result.stdout
