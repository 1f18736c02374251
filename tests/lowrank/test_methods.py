import pytest
import torch
from torch import nn

import lowrank
from lowrank.methods import METHODS, build_module, dense_cost, method_for, output_shape_changes
from tests.conftest import relative_error

CONV_CASES = {
    "plain": dict(kernel_size=3),
    "padded": dict(kernel_size=3, padding=1),
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "stride_h": dict(kernel_size=3, stride=(2, 1), padding=1),
    "stride_w": dict(kernel_size=3, stride=(1, 2), padding=1),
    "dilated": dict(kernel_size=3, dilation=2, padding=2),
    "rect_kernel": dict(kernel_size=(3, 5), padding=(1, 2), stride=(1, 2)),
    "asym_padding": dict(kernel_size=3, padding=(0, 2)),
    "same_even_kernel": dict(kernel_size=4, padding="same"),
    "same_dilated": dict(kernel_size=3, padding="same", dilation=(1, 3)),
    "valid": dict(kernel_size=3, padding="valid"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="replicate", stride=2),
    "circular": dict(kernel_size=3, padding=1, padding_mode="circular"),
    "same_reflect_even": dict(kernel_size=(2, 4), padding="same", padding_mode="reflect"),
    "no_bias": dict(kernel_size=3, padding=1, bias=False),
    "one_by_five": dict(kernel_size=(1, 5), padding=(0, 2)),
    "pointwise": dict(kernel_size=1),
    "pointwise_padded_strided": dict(kernel_size=1, padding=1, stride=2),
    "pointwise_reflect": dict(kernel_size=1, padding=2, padding_mode="reflect"),
}


def replacement(method, layer, ranks):
    """The decomposed Sequential at ``ranks``, with the method's weights, in the layer's dtype."""
    modules = nn.Sequential(*(build_module(spec, dtype=layer.weight.dtype) for spec in method.specs(layer, ranks)))
    with torch.no_grad():
        for module, weight in zip(modules, method.weights(layer, ranks)):
            module.weight.copy_(weight)
        if layer.bias is not None:
            modules[-1].bias.copy_(layer.bias)
    return modules


CONV_METHODS = ("svd", "spatial", "tucker2")
SUPPORTED_CONV_CASES = [
    (method, case)
    for case in CONV_CASES
    for method in CONV_METHODS
    if not METHODS[method].unsupported(nn.Conv2d(6, 8, **CONV_CASES[case]))
]


def test_only_1x1_kernels_are_refused_and_only_by_the_spatial_methods():
    refused = {(method, case) for case in CONV_CASES for method in CONV_METHODS} - set(SUPPORTED_CONV_CASES)
    pointwise = ("pointwise", "pointwise_padded_strided", "pointwise_reflect")
    assert refused == {(method, case) for method in ("spatial", "tucker2") for case in pointwise}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method_name,case", SUPPORTED_CONV_CASES)
def test_full_rank_conv_matches_dense(method_name, case):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, **CONV_CASES[case])
    method = METHODS[method_name]
    x = torch.randn(2, 6, 13, 11)
    decomposed = replacement(method, layer, method.full_ranks(layer))
    assert relative_error(decomposed(x), layer(x)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 24), (2, 5, 24)])
def test_full_rank_linear_matches_dense(shape):
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    x = torch.randn(*shape)
    decomposed = replacement(METHODS["svd"], layer, (16,))
    assert relative_error(decomposed(x), layer(x)) < 1e-5


def test_spatial_takes_the_cheaper_order():
    spatial = METHODS["spatial"]
    assert spatial.vertical_first(nn.Conv2d(8, 8, 3, stride=(2, 1)))
    assert spatial.vertical_first(nn.Conv2d(8, 8, 3))  # a tie keeps AMCT's order
    horizontal = nn.Conv2d(8, 8, 3, stride=(1, 2), padding=1)
    assert not spatial.vertical_first(horizontal)
    first, last = spatial.specs(horizontal, (4,))
    assert first["args"]["kernel_size"] == [1, 3] and first["args"]["stride"] == [1, 2]
    assert last["args"]["kernel_size"] == [3, 1] and last["args"]["stride"] == [1, 1]


@pytest.mark.parametrize("method_name", ["svd", "spatial", "tucker2"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cost_matches_pytorch_flop_counter(method_name, stride):
    # Input sizes where every layer's output covers the image exactly, so borders do not count.
    layer = nn.Conv2d(16, 24, 3, stride=stride, padding=1)
    method = METHODS[method_name]
    ranks = tuple(max(1, r // 3) for r in method.full_ranks(layer))
    x = torch.randn(1, 16, 16, 16)
    positions = (16 // stride) ** 2
    decomposed = replacement(method, layer, ranks)
    assert lowrank.count_flops(decomposed, x) == method.cost(layer, ranks).macs * positions
    assert lowrank.count_flops(layer, x) == dense_cost(layer).macs * positions
    assert sum(m.weight.numel() for m in decomposed) == method.cost(layer, ranks).params


def test_error_falls_as_rank_grows():
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 9, 9)
    for name in ("svd", "spatial", "tucker2"):
        method = METHODS[name]
        full = method.full_ranks(layer)
        errors = [
            relative_error(replacement(method, layer, tuple(max(1, f * k // 4) for f in full))(x), layer(x))
            for k in (1, 2, 3, 4)
        ]
        assert errors == sorted(errors, reverse=True), name
        assert errors[-1] < 1e-5, name


def test_method_for_layer_kinds():
    assert method_for(nn.Linear(4, 4), "spatial").name == "svd"
    assert method_for(nn.Conv2d(4, 4, 1), "tucker2").name == "svd"
    assert method_for(nn.Conv2d(4, 4, 3), "tucker2").name == "tucker2"
    with pytest.raises(ValueError, match="valid methods: svd, spatial, tucker2"):
        method_for(nn.Conv2d(4, 4, 3), "cp")


def test_output_shape_changes_reports_a_wrong_structure():
    layer = nn.Conv2d(4, 6, 3, padding=1)
    specs = METHODS["spatial"].specs(layer, (2,))
    assert output_shape_changes(layer, specs) is None
    specs[1]["args"]["padding"] = [0, 0]
    assert "output shape (1, 6, 7, 5) instead of (1, 6, 7, 7)" in output_shape_changes(layer, specs)


def test_dense_cost_of_a_grouped_conv():
    layer = nn.Conv2d(8, 8, 3, groups=4)
    assert dense_cost(layer).params == dense_cost(layer).macs == layer.weight.numel()
