"""The ResNet-50 recipe end to end on CPU with 2 gloo processes, on a tiny ImageFolder written here."""

import json
import re
import sys

import pytest
import torch
import torchvision
from PIL import Image

from lowrank.io import save_state_dict
from tests.conftest import RECIPES, accelerate_launch, free_port, run, torchrun

RECIPE = RECIPES / "resnet50_imagenet.py"
SMALL = [
    "--image-size",
    "32",
    "--train-batch-size",
    "2",
    "--test-batch-size",
    "4",
    "--workers",
    "0",
    "--log-steps",
    "1",
    "--lr-warmup-epochs",
    "0",
]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """train/ and val/ with 2 classes of random 40x40 images, and pretrained weights for 2 classes."""
    root = tmp_path_factory.mktemp("imagenet")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 3)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for index in range(count):
                pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{index}.png")
    torch.manual_seed(0)
    save_state_dict(torchvision.models.resnet50(num_classes=2).state_dict(), root / "pretrained.pth")
    return root


def test_online_decomposes_on_rank_zero_and_resumes(imagenet, tmp_path):
    out = tmp_path / "online"
    args = [RECIPE, *SMALL, "--data-path", imagenet, "--pretrained-path", imagenet / "pretrained.pth"]
    args += ["--tensor-decompose", "--method", "spatial", "--output-dir", out, "--checkpoint-steps", "1"]
    result = run(accelerate_launch(*args, "--steps", "2", port=free_port()))
    log = result.stdout + result.stderr
    assert log.count("[lowrank] auto_decomposition start.") == 1  # rank 0 only
    assert log.count("[lowrank] decompose_network start.") == 1  # the other rank rebuilds and loads
    assert int(re.search(r"\[Decompose\] (\d+) layer", result.stdout).group(1)) >= 40
    assert re.search(r"\[Train\] Step\[2/2\] Loss: [\d.]+, [\d.]+ images/s", result.stdout)
    assert "Top-5: 100.00%" in result.stdout and "/6)" in result.stdout  # 2 classes: always in the top 5
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "online" and results["steps"] == 2 and results["total"] == 6
    assert results["params"] < 0.7 * 23_512_130  # resnet50 with 2 classes, dense
    assert (out / "checkpoints" / "step_1").is_dir() and (out / "checkpoints" / "step_2").is_dir()

    resumed = run(accelerate_launch(*args, "--steps", "3", "--resume", port=free_port()))
    text = resumed.stdout + resumed.stderr
    assert f"[Resume] from {out / 'checkpoints' / 'step_2'} at step 2" in text
    assert "auto_decomposition start." not in text  # reused from the first run
    assert "[Train] Step[3/3]" in text and "[Train] Step[1/3]" not in text


def test_offline_loads_on_every_rank(imagenet, tmp_path):
    out = tmp_path / "offline"
    paths = ["--decompose-info-path", out / "info.json", "--decomposed-weights-path", out / "weights.pth"]
    step1 = [sys.executable, RECIPES / "decompose_model.py", "--model", "resnet50", "--method", "spatial"]
    run([*map(str, step1), "--pretrained-path", str(imagenet / "pretrained.pth"), *map(str, paths)])
    result = run(
        torchrun(RECIPE, *SMALL, "--data-path", imagenet, "--tensor-decompose", "--run-mode", "offline", *paths)
        + ["--steps", "1", "--output-dir", str(out)]
    )
    log = result.stdout + result.stderr
    assert log.count("[lowrank] decompose_network start.") == 2 and "auto_decomposition start." not in log
    assert "[Train] Step[1/1] Loss:" in result.stdout and "Top-5:" in result.stdout


def test_bad_data_path_and_weights_are_named(imagenet, tmp_path):
    result = run([sys.executable, str(RECIPE), "--data-path", str(tmp_path)], check=False, timeout=300)
    assert result.returncode != 0 and f"--data-path {tmp_path} has no {tmp_path / 'train'}" in result.stderr
    result = run(
        [sys.executable, str(RECIPE), *map(str, SMALL), "--data-path", str(imagenet), "--tensor-decompose"],
        check=False,
        timeout=300,
    )
    assert result.returncode != 0 and "--pretrained-path (or --weights) is required in online mode" in result.stderr


def test_synthetic_baseline_on_one_process(tmp_path):
    command = [sys.executable, RECIPE, *SMALL, "--synthetic", "--steps", "1", "--output-dir", tmp_path]
    result = run([str(arg) for arg in command])
    assert "[Train] Step[1/1] Loss:" in result.stdout and "/128), Top-5:" in result.stdout  # 10 classes
    assert json.loads((tmp_path / "results.json").read_text())["mode"] == "baseline"
