"""The ResNet-50 recipe end to end on CPU with 2 gloo processes, on a tiny ImageFolder written here."""

import ast
import json
import re
import runpy
import shlex
import shutil
import sys
import urllib.error

import numpy
import pytest
import torch
import torchvision
from msmodelslim.pytorch import low_rank_decompose as msmodelslim
from PIL import Image

from launch.entry import RunError
from launch.model import torchvision_classifier
from lowrank.io import save_state_dict
from lowrank.msmodelslim import config_json
from tests.conftest import RECIPES, accelerate_launch, free_port, needs_deepspeed, run, torchrun

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


def test_online_default_is_msmodelslims_from_ratio_and_every_rank_replays_its_config(imagenet, tmp_path):
    out = tmp_path / "online"
    args = [RECIPE, *SMALL, "--data-path", imagenet, "--pretrained-path", imagenet / "pretrained.pth"]
    result = run(accelerate_launch(*args, "--tensor-decompose", "--output-dir", out, "--steps", "1", port=free_port()))
    log = result.stdout + result.stderr
    # Rank 0 runs msModelSlim's Decompose(model, config_file).from_ratio(0.5); the other replays that file.
    assert log.count("[lowrank] decompose_network start.") == 2 and "auto_decomposition start." not in log
    torch.manual_seed(0)
    expected = msmodelslim.Decompose(torchvision.models.resnet50(num_classes=2)).from_ratio(0.5).decompose_config
    written = json.loads((out / "decompose_info.json").read_text())
    assert written == config_json(expected)
    assert int(re.search(r"\[Decompose\] (\d+) layer", result.stdout).group(1)) == len(expected)
    assert json.loads((out / "results.json").read_text())["steps"] == 1


def test_online_decomposes_on_rank_zero_and_resumes(imagenet, tmp_path):
    out = tmp_path / "online"
    args = [RECIPE, *SMALL, "--data-path", imagenet, "--pretrained-path", imagenet / "pretrained.pth"]
    args += ["--tensor-decompose", "--method", "spatial", "--output-dir", out, "--checkpoint-steps", "1"]
    result = run(accelerate_launch(*args, "--steps", "2", port=free_port()))
    log = result.stdout + result.stderr
    assert "[Setup] 2 process(es) on cpu (gloo), mixed precision no\n" in result.stdout
    assert log.count("[lowrank] auto_decomposition start.") == 1  # rank 0 only
    assert log.count("[lowrank] decompose_network start.") == 1  # the other rank rebuilds and loads
    assert int(re.search(r"\[Decompose\] (\d+) layer", result.stdout).group(1)) >= 40
    assert re.search(r"\[Train\] Step\[2/2\] Loss: [\d.]+, [\d.]+ images/s", result.stdout)
    assert "Top-5: 100.00%" in result.stdout and "/6)" in result.stdout  # 2 classes: always in the top 5
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "online" and results["steps"] == 2 and results["total"] == 6
    assert results["params"] < 0.7 * 23_512_130  # resnet50 with 2 classes, dense
    assert (out / "checkpoints" / "step_1").is_dir() and (out / "checkpoints" / "step_2").is_dir()

    # --steps sets the cosine schedule's length: resuming with another is refused, before any work.
    other = run([sys.executable, *map(str, args), "--steps", "3", "--resume"], check=False, timeout=300)
    assert other.returncode != 0 and "--steps 2 (now 3)" in other.stderr
    shutil.rmtree(out / "checkpoints" / "step_2")
    resumed = run(accelerate_launch(*args, "--steps", "2", "--resume", port=free_port()))
    text = resumed.stdout + resumed.stderr
    assert f"[Resume] from {out / 'checkpoints' / 'step_1'} at step 1" in text
    assert "auto_decomposition start." not in text  # reused from the first run
    assert "[Train] Step[2/2]" in text and "[Train] Step[1/2]" not in text


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


# ViT-B runs online only (86 M parameters): its rank 1 replays the info file there, as offline runs do.
@pytest.mark.parametrize("model, offline", [("mobilenet_v3_small", True), ("vit_b_16", False)])
def test_other_torchvision_classifiers_run_online_and_offline(model, offline, imagenet, tmp_path):
    torch.manual_seed(0)
    pretrained = tmp_path / f"{model}.pth"
    save_state_dict(torchvision_classifier(model, 2, image_size=32).state_dict(), pretrained)
    recipe = [*SMALL, "--model", model, "--data-path", imagenet, "--steps", "1", "--tensor-decompose"]
    online = run(torchrun(RECIPE, *recipe, "--pretrained-path", pretrained, "--output-dir", tmp_path / "online"))
    log = online.stdout + online.stderr
    assert "[lowrank] decompose_network start." in log and "[Train] Step[1/1] Loss:" in online.stdout, log
    if not offline:
        return
    paths = ["--decompose-info-path", tmp_path / "decompose_info.json"]
    paths += ["--decomposed-weights-path", tmp_path / "decomposed_weights.pth"]
    step1 = [sys.executable, RECIPES / "decompose_model.py", "--model", model, "--image-size", "32"]
    run([*map(str, step1), "--ratio", "0.5", "--pretrained-path", str(pretrained), *map(str, paths)])
    replayed = run(torchrun(RECIPE, *recipe, "--run-mode", "offline", *paths, "--output-dir", tmp_path / "offline"))
    log = replayed.stdout + replayed.stderr
    assert log.count("[lowrank] decompose_network start.") == 2 and "Top-5:" in replayed.stdout, log


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


def test_an_epoch_counts_the_short_step_that_ends_it(imagenet, tmp_path):
    """16 images in batches of 2, 3 batches a step: Accelerate steps at every epoch end, so an epoch is
    3 steps (3, 3 and 2 batches), not 8 // 3 = 2; --epochs and the evaluation after each epoch follow."""
    command = [sys.executable, RECIPE, *SMALL, "--data-path", imagenet, "--gradient-accumulation-steps", "3"]
    result = run([str(arg) for arg in [*command, "--epochs", "2", "--output-dir", tmp_path]])
    assert "[Train] Step[6/6]" in result.stdout
    assert result.stdout.count("[Test] Loss:") == 2  # after step 3, and at the end


def test_synthetic_validation_images_are_not_training_images():
    recipe = runpy.run_path(str(RECIPE))
    train_set, val_set = recipe["load_data"](
        recipe["get_args_parser"]().parse_args(["--synthetic", "--image-size", "32"])
    )
    train_set.transform = val_set.transform = None  # the generated images, without the random crops
    seen = {image.tobytes() for image, _ in train_set}
    assert not any(image.tobytes() in seen for image, _ in val_set)


def test_the_docstring_smoke_command_does_not_diverge(tmp_path):
    """The CPU command of the docstring, as written: --lr is used as given, whatever the global batch."""
    doc = ast.get_docstring(ast.parse(RECIPE.read_text()))
    command = re.search(r"accelerate launch --config_file recipes/configs/cpu_2proc.yaml (.+?)\n\n", doc, re.S)
    args = shlex.split(command.group(1).replace("\\\n", " "))
    assert args[0] == "recipes/resnet50_imagenet.py" and "--synthetic" in args
    result = run(accelerate_launch(*args, "--log-steps", "1", "--output-dir", tmp_path, port=free_port()))
    losses = [float(loss) for loss in re.findall(r"\[Train\] Step\[\d+/\d+\] Loss: ([\d.]+)", result.stdout)]
    test_loss = float(re.search(r"\[Test\] Loss: ([\d.]+)", result.stdout).group(1))
    assert len(losses) == 4 and max(losses) < 3.5 and test_loss < 3.5, result.stdout  # ln(10) = 2.3 at chance


@needs_deepspeed
@pytest.mark.parametrize(
    "flags, message",
    [
        # DeepSpeed's bf16 casts BatchNorm's weights but not its running statistics: torch's batch_norm
        # would fail at the first forward pass, after all the setup.
        (
            ["--mixed-precision", "bf16"],
            "error: mixed precision bf16 (--mixed-precision or the launcher's config) does not run under DeepSpeed",
        ),
        # DeepSpeed broadcasts the weights through a byte view, which a channels_last weight refuses.
        (["--channels-last"], "error: --channels-last does not run under DeepSpeed"),
    ],
)
def test_settings_deepspeed_cannot_run_are_refused_before_any_work(flags, message, tmp_path):
    out = tmp_path / "out"
    args = [RECIPE, *SMALL, "--synthetic", "--steps", "1", *flags, "--output-dir", out]
    result = run(accelerate_launch(*args, port=free_port(), config="deepspeed_zero2.yaml"), check=False, timeout=300)
    assert result.returncode != 0 and message in result.stderr
    assert "[Train]" not in result.stdout and not out.exists()


def image_folder(root, classes, count=1):
    """train/ and val/ under ``root`` with ``count`` 8x8 images in each of ``classes`` (a dict split: names)."""
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (8, 8)).save(root / split / name / f"{index}.png")
    return root


@pytest.mark.parametrize(
    "classes,message",
    [
        ({"train": ["cat", "dog"], "val": ["cat", "dog", "emu"]}, "val/ holds class folders that train/ lacks: emu"),
        ({"train": ["cat"], "val": ["cat"]}, "has a single class folder: a classifier needs two or more"),
    ],
)
def test_class_folders_that_would_mislabel_are_refused(classes, message, tmp_path):
    recipe = runpy.run_path(str(RECIPE))
    args = recipe["get_args_parser"]().parse_args(["--data-path", str(image_folder(tmp_path, classes))])
    with pytest.raises(RunError) as error:
        recipe["load_data"](args)
    assert str(error.value).startswith(f"--data-path {tmp_path}") and message in str(error.value)


def test_a_val_folder_with_fewer_classes_keeps_the_labels_of_train(tmp_path):
    """ImageFolder numbers each folder's classes: val's dog alone would have been label 0, train's cat."""
    recipe = runpy.run_path(str(RECIPE))
    image_folder(tmp_path, {"train": ["cat", "dog", "emu"], "val": ["dog", "emu"]})
    train_set, val_set = recipe["load_data"](recipe["get_args_parser"]().parse_args(["--data-path", str(tmp_path)]))
    assert [label for _, label in val_set] == [1, 2] and val_set.targets == [1, 2]
    assert val_set.classes == train_set.classes == ["cat", "dog", "emu"]


def test_a_class_folder_without_images_is_named(tmp_path):
    recipe = runpy.run_path(str(RECIPE))
    image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "README.txt").write_text("")
    args = recipe["get_args_parser"]().parse_args(["--data-path", str(tmp_path)])
    with pytest.raises(RunError) as error:
        recipe["load_data"](args)
    assert str(error.value).startswith(f"--data-path {tmp_path}: {tmp_path / 'train'}: Found no valid file for")


def test_images_16_bit_are_scaled_and_unreadable_ones_named(tmp_path):
    recipe = runpy.run_path(str(RECIPE))
    Image.fromarray(numpy.full((4, 4), 40000, dtype=numpy.uint16)).save(tmp_path / "16bit.png")
    assert recipe["load_image"](str(tmp_path / "16bit.png")).getpixel((0, 0)) == (156, 156, 156)  # not white
    Image.new("RGB", (64, 64)).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])
    with pytest.raises(OSError) as error:  # PIL's message does not name the file
        recipe["load_image"](str(tmp_path / "cut.jpg"))
    assert str(error.value).startswith(f"cannot read image {tmp_path / 'cut.jpg'}: ")


def test_weights_that_do_not_fit_are_named_before_any_work(imagenet, tmp_path, monkeypatch):
    """Before the process group starts, on every rank (on rank 0 amid a decomposition, the others would
    wait for it), and before a training run without --resume moves the earlier run's checkpoints aside."""
    recipe = runpy.run_path(str(RECIPE))
    out = tmp_path / "out"
    save_state_dict(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r18.pth")
    common = [*map(str, SMALL), "--data-path", str(imagenet), "--output-dir", str(out)]
    for flags, message in (
        (
            ["--pretrained-path", str(tmp_path / "r18.pth"), "--weights", "DEFAULT"],
            "--weights and --pretrained-path both give the pretrained weights: pass one",
        ),
        # torchvision's references spell the name with its enum's
        (["--weights", "ResNet50_Weights.DEFAULT"], "--weights DEFAULT has 1000 classes, the dataset 2"),
        (["--cpu", "--use-gpu"], "--cpu and --use-gpu ask for different devices: pass one"),
    ):
        with pytest.raises(RunError) as error:
            recipe["main"](recipe["get_args_parser"]().parse_args([*common, *flags]))
        assert str(error.value).startswith(message)
    assert not out.exists()

    def offline(self, progress):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    with pytest.raises(RunError) as error:
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        recipe["rank_zero_first"](lambda: recipe["pretrained_weights_path"](weights), "--weights IMAGENET1K_V2")
    assert str(error.value).startswith("--weights IMAGENET1K_V2: cannot download https://")
    assert "pass it as --pretrained-path" in str(error.value)


def test_runs_that_would_mislead_are_refused(imagenet, tmp_path):
    """Weights of another model, and --test-only of a random initialisation."""
    command = [sys.executable, str(RECIPE), *map(str, SMALL), "--data-path", str(imagenet)]
    save_state_dict(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r18.pth")
    for flags, message in (
        (
            ["--pretrained-path", str(tmp_path / "r18.pth")],
            f"error: rank 0: --pretrained-path: {tmp_path / 'r18.pth'} does not fit the model: ",
        ),
        (["--test-only"], "error: --test-only would evaluate a randomly initialised model"),
    ):
        result = run([*command, *flags, "--output-dir", str(tmp_path / "out")], check=False, timeout=300)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "[Train]" not in result.stdout
