"""torchvision classification models must come out of auto_decomposition still running, with the
same output shape, under lowrank's rules (``ratio=0.3``) and under AMCT's (no policy keyword). The
default run covers one model of each family of layers quickly; the slow run covers the others but the
large plain CNNs (AlexNet, VGG, Wide ResNet), whose layers the others have too.
benchmarks/torchvision_sweep.py decomposes, replays and compares every one of them."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import lowrank


def check_still_runs(model, x, **policy):
    model.eval()
    with torch.no_grad():
        expected = model(x).shape
        model, changes = lowrank.auto_decomposition(model, **policy)
        assert model(x).shape == expected
    return changes


def amct_candidates(model) -> set[str]:
    """The convs AMCT's rules may decompose: k x k kernels (k >= 3), no dilation, no groups, stride <= 2."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and min(module.kernel_size) >= 3
        and module.groups == 1
        and max(module.dilation) == 1
        and max(module.stride) <= 2
    }


@pytest.mark.parametrize("method", ["spatial", pytest.param("tucker2", marks=pytest.mark.slow)])
def test_resnet18(method):
    assert check_still_runs(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64), method=method)


def test_resnet18_amct_default():
    # every k x k conv of a ResNet has the channels AMCT needs: all of them, and nothing else (1x1, fc)
    model = torchvision.models.resnet18(num_classes=10)
    candidates = amct_candidates(model)
    changes = check_still_runs(model, torch.randn(1, 3, 64, 64))
    assert set(changes) == candidates and len(candidates) == 17


def test_mobilenet_v3_small():
    # depthwise convs and squeeze-excitation 1x1 convs (AMCT's rules decompose none of them)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    assert check_still_runs(model, torch.randn(1, 3, 64, 64), ratio=0.3)


def test_tiny_vision_transformer_decomposes_attention_projections_unless_observed(lowrank_log):
    """MultiheadAttention passes out_proj's weight to its functional form: decomposed, that weight is the
    product of the factors (the same outputs, no saving there), and the observed pass keeps it dense."""
    x = torch.randn(2, 3, 32, 32)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256, num_classes=10
    )
    observed = copy.deepcopy(model)
    changes = check_still_runs(model, x, min_rank=1)
    assert sum(name.endswith("out_proj") for name in changes) == 2 and any("mlp" in name for name in changes)
    changes = check_still_runs(observed, x, min_rank=1, example_input=x)
    assert not any(name.endswith("out_proj") for name in changes) and any("mlp" in name for name in changes)
    assert any("self_attention.out_proj': its weight is used outside its own forward (" in line for line in lowrank_log)


SLOW_MODELS = {
    "resnext50_32x4d": 128,
    "densenet121": 128,
    "googlenet": 128,
    "inception_v3": 299,
    "squeezenet1_1": 128,
    "shufflenet_v2_x1_0": 128,
    "mnasnet1_0": 128,
    "efficientnet_b0": 128,
    "efficientnet_v2_s": 128,
    "regnet_y_400mf": 128,
    "convnext_tiny": 128,
    "mobilenet_v2": 128,
    "vit_b_16": 224,
    "swin_t": 224,
    "swin_v2_t": 256,
    "maxvit_t": 224,
}


def slow_model(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    size = SLOW_MODELS[name]
    return torchvision.models.get_model(name, **kwargs), torch.randn(1, 3, size, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_MODELS))
def test_torchvision_model(name):
    model, x = slow_model(name)
    assert check_still_runs(model, x, ratio=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_MODELS))
def test_torchvision_model_amct_default(name):
    # Many of these models have no conv AMCT decomposes (depthwise, 1x1, patch embeddings): no changes.
    model, x = slow_model(name)
    candidates = amct_candidates(model)
    changes = check_still_runs(model, x)
    assert set(changes) <= candidates
