"""decompose_model.py in-process, on inputs the MNIST tests do not cover (torchvision models)."""

import json
import runpy

import pytest
import safetensors.torch
import torch
import torchvision

from launch.entry import RunError
from tests.conftest import RECIPES


@pytest.fixture(scope="module")
def recipe():
    return runpy.run_path(str(RECIPES / "decompose_model.py"))


def run_main(recipe, *args):
    recipe["main"](recipe["get_args_parser"]().parse_args(list(map(str, args))))


def test_class_count_of_a_safetensors_file(recipe, tmp_path):
    """A safetensors file sorts its keys: its last weight is not the classifier (layer4.1.conv2.weight
    would have given 512 classes)."""
    torch.manual_seed(0)
    safetensors.torch.save_file(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.safetensors")
    info, weights = tmp_path / "out" / "info.json", tmp_path / "out" / "weights.pth"
    run_main(
        recipe,
        "--model",
        "resnet18",
        "--method",
        "svd",
        "--pretrained-path",
        tmp_path / "r18.safetensors",
        "--decompose-info-path",
        info,
        "--decomposed-weights-path",
        weights,
    )
    assert json.loads(info.read_text())["layers"]
    assert torch.load(weights, weights_only=True)["fc.bias"].shape == (3,)


def test_paths_inside_each_other_are_refused_before_any_work(recipe, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    info = tmp_path / "out"
    with pytest.raises(RunError) as error:
        run_main(
            recipe,
            "--model",
            "resnet18",
            "--pretrained-path",
            tmp_path / "r18.pth",
            "--decompose-info-path",
            info,
            "--decomposed-weights-path",
            info / "weights.pth",
        )
    assert str(error.value) == (
        f"--decompose-info-path {info} and --decomposed-weights-path {info}/weights.pth: one lies inside "
        "the other: give each its own"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r18.pth"]  # nothing written


def test_identity_of_a_file_under_a_file_is_none(recipe, tmp_path):
    """The restore of the earlier info file asks it; raising there left the new info file in place."""
    (tmp_path / "file").write_text("")
    assert recipe["_identity"](tmp_path / "file" / "weights.pth") is None
