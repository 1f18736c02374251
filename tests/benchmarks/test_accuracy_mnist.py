import json
import shutil

import pytest
import torch

import lowrank
from launch.mnist import Net, load_mnist
from lowrank.io import load_state_dict
from tests.benchmarks.conftest import run_quick
from tests.conftest import needs_data


@pytest.mark.slow
@pytest.mark.integration
@needs_data
def test_quick_accuracy_benchmark_runs_the_recipes(tmp_path, mnist_subset, baseline):
    output = tmp_path / "accuracy_mnist.json"
    # --reuse takes the session's baseline run, as an interrupted benchmark takes its own.
    shutil.copytree(baseline.parent, tmp_path / "runs" / "baseline")
    arguments = ["--data-path", mnist_subset, "--output-dir", tmp_path / "runs", "--reuse"]
    stdout = run_quick("accuracy_mnist.py", output, *arguments)
    assert "before finetune" in stdout
    figures = json.loads(output.read_text())
    (row,) = figures["rows"]
    assert row["method"] == "spatial" and row["policy"] == "ratio=0.3" and row["recipe"] == "mnist_online.py"
    assert row["flops"] < figures["baseline"]["flops"] and list(row["ranks"]) == ["conv2"]
    # The figure before finetuning is the decomposed model's own: its info file and weights give it here.
    folder = tmp_path / "runs" / "spatial_ratio=0.3"
    model, _ = lowrank.decompose_network(Net(), folder / "decompose_info.json")
    model.load_state_dict(load_state_dict(folder / "decomposed_weights.pth"))
    model.eval()
    test_set = load_mnist(mnist_subset, train=False)
    images, labels = next(iter(torch.utils.data.DataLoader(test_set, batch_size=len(test_set))))
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    assert row["accuracy_before"] == correct / len(test_set)
    assert 0 <= row["accuracy_finetuned"] <= 1
    assert output.with_suffix(".png").stat().st_size > 0
