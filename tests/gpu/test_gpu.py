"""The GPU path on a CUDA GPU: decomposition on the device, and the ResNet-50 recipe on one GPU with
NCCL, bf16 and channels_last, and under DeepSpeed ZeRO. Skipped without a GPU (CI has none; the CPU
tests cover the same code there); run them where there is one: ``pytest -m gpu``."""

import copy
import json
import re
import shutil

import pytest
import torch
import torchvision

import lowrank
from lowrank.io import save_state_dict
from tests.conftest import RECIPES, accelerate_launch, free_port, needs_deepspeed, relative_error, run, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RECIPE = RECIPES / "resnet50_imagenet.py"
SMALL = ["--synthetic", "--image-size", "64", "--train-batch-size", "16", "--test-batch-size", "32"]
SMALL += ["--workers", "2", "--log-steps", "1", "--lr-warmup-epochs", "0"]  # GPUs without --use-gpu


@pytest.fixture
def exact_float32():
    """float32 convolutions and products without TF32, whose 10-bit mantissa would hide a wrong factor,
    and cuDNN's deterministic algorithms, so that a model and its replay give the same bits."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = saved


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Weights of a ResNet-50 with the 10 classes of the recipe's --synthetic data."""
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.manual_seed(0)
    save_state_dict(torchvision.models.resnet50(num_classes=10).state_dict(), path)
    return path


@pytest.mark.parametrize("method", ["spatial", "tucker2"])
def test_decomposing_on_the_gpu_is_as_exact_as_on_the_cpu(method, exact_float32, tmp_path):
    """Every layer's factors computed on the GPU approximate the dense layer as well as those computed
    on the CPU (the randomized range finder draws other vectors there: the factors differ, their error
    must not); they stay on the GPU in channels_last, and the info file replays them there bit for bit."""
    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()
    on_cpu, on_gpu = copy.deepcopy(dense), copy.deepcopy(dense).cuda().to(memory_format=torch.channels_last)
    _, changes = lowrank.auto_decomposition(on_cpu, method=method, ratio=0.5)
    _, gpu_changes = lowrank.auto_decomposition(on_gpu, tmp_path / "info.json", method=method, ratio=0.5)
    assert gpu_changes == changes and len(changes) >= 10
    for name in changes:
        layer = dense.get_submodule(name)
        x = (
            torch.randn(4, layer.in_features)
            if isinstance(layer, torch.nn.Linear)
            else torch.randn(4, layer.in_channels, 12, 12)
        )
        expected = layer(x)
        cpu_error = relative_error(on_cpu.get_submodule(name)(x), expected)
        replacement = on_gpu.get_submodule(name)
        x = x.cuda().to(memory_format=torch.channels_last) if x.dim() == 4 else x.cuda()
        gpu_error = relative_error(replacement(x).cpu(), expected)
        assert gpu_error <= 1.01 * cpu_error, (name, gpu_error, cpu_error)
        for parameter in replacement.parameters():
            assert parameter.is_cuda and parameter.dtype == torch.float32
            assert parameter.dim() != 4 or parameter.is_contiguous(memory_format=torch.channels_last)

    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    replay = copy.deepcopy(dense).cuda().to(memory_format=torch.channels_last)
    lowrank.decompose_network(replay, tmp_path / "info.json")
    replay.load_state_dict(on_gpu.state_dict(), strict=True)
    assert torch.equal(replay.eval()(x), on_gpu(x))


def test_bfloat16_model_on_the_gpu_keeps_its_dtype():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    dense_output = model(x)
    _, changes = lowrank.auto_decomposition(model, method="tucker2", ratio=0.7)
    assert changes and all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    output = model(x)
    assert output.shape == dense_output.shape and torch.isfinite(output).all()


def test_recipe_online_on_one_gpu_with_nccl_bf16_and_resume(pretrained, tmp_path):
    out = tmp_path / "online"
    args = [RECIPE, *SMALL, "--mixed-precision", "bf16", "--tensor-decompose", "--divisor", "8"]
    args += ["--pretrained-path", pretrained, "--output-dir", out, "--checkpoint-steps", "2"]
    result = run(torchrun(*args, "--steps", "4", nproc=1))
    assert "[Setup] 1 process(es) on cuda (nccl), mixed precision bf16\n" in result.stdout
    assert re.search(r"\[Train\] Step\[4/4\] Loss: [\d.]+, [\d.]+ images/s", result.stdout)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["params"] < 0.6 * 23_528_522
    layers = json.loads((out / "decompose_info.json").read_text())["layers"]
    ranks = [rank for layer in layers for rank in layer["ranks"]]
    assert len(layers) >= 40 and all(rank % 8 == 0 for rank in ranks), ranks

    # The documented one-GPU command (accelerate launch) resumes the run, without decomposing again.
    shutil.rmtree(out / "checkpoints" / "step_4")
    resumed = run(accelerate_launch(*args, "--steps", "4", "--resume", port=free_port(), config=None, num_processes=1))
    assert f"[Resume] from {out / 'checkpoints' / 'step_2'} at step 2" in resumed.stdout
    assert "auto_decomposition start." not in resumed.stdout + resumed.stderr
    assert "[Train] Step[4/4]" in resumed.stdout


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_recipe_online_under_deepspeed_zero_on_the_gpu(stage, pretrained, tmp_path):
    out = tmp_path / f"zero{stage}"
    args = [RECIPE, *SMALL, "--mixed-precision", "no", "--tensor-decompose", "--pretrained-path", pretrained]
    args += ["--output-dir", out, "--steps", "3", "--save-path", out / "finetuned.pth"]
    config = f"deepspeed_zero{stage}.yaml"
    result = run(accelerate_launch(*args, port=free_port(), config=config, num_processes=1))
    assert f"[Setup] 1 process(es) on cuda (nccl), mixed precision no, DeepSpeed ZeRO-{stage}\n" in result.stdout
    assert "[Train] Step[3/3]" in result.stdout and "[Test] Loss:" in result.stdout
    weights = torch.load(out / "finetuned.pth", weights_only=True)
    assert any(name.endswith(".0.weight") for name in weights)  # whole and decomposed, also under ZeRO-3
    assert all(torch.isfinite(weight).all() for weight in weights.values())
