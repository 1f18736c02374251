"""The replacement modules answer for the dense layer: its configuration, read-only, and ``weight`` and
``bias``, the dense equivalent of the factors; they save, copy and export as plain layers."""

import copy
import pickle

import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn
from torch.func import functional_call

import lowrank
from lowrank.methods import METHODS
from lowrank.modules import SpatialConv2d, SVDConv2d, SVDEmbedding, SVDLinear, Tucker2Conv2d, replacement_class
from tests.lowrank.test_methods import CONV_CASES, SUPPORTED_CONV_CASES, replacement


def decomposed_layer(layer, **options):
    """``layer``'s replacement from ``auto_decomposition`` of a model holding it alone."""
    model, changes = lowrank.auto_decomposition(nn.Sequential(layer), **options)
    assert list(changes) == ["0"]
    return model[0]


def as_dense(layer, replacement, *inputs):
    """``layer``'s own forward with the replacement's ``weight`` and ``bias``."""
    parameters = {"weight": replacement.weight}
    if getattr(layer, "bias", None) is not None:
        parameters["bias"] = replacement.bias
    return functional_call(layer, parameters, inputs)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method_name,case", SUPPORTED_CONV_CASES)
def test_a_convs_weight_is_the_dense_equivalent_of_its_factors(method_name, case):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, **CONV_CASES[case]).double()
    replacement = decomposed_layer(layer, method=method_name, rank=3, min_rank=1)
    expected = {"svd": SVDConv2d, "spatial": SpatialConv2d, "tucker2": Tucker2Conv2d}
    assert type(replacement) is expected["svd" if layer.kernel_size == (1, 1) else method_name]
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    assert replacement.weight.shape == layer.weight.shape
    torch.testing.assert_close(as_dense(layer, replacement, x), replacement(x), rtol=1e-10, atol=1e-12)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(replacement, name) == getattr(layer, name), name


@pytest.mark.parametrize("method_name", ["svd", "spatial", "tucker2"])
def test_at_full_rank_the_weight_is_the_layers_own(method_name):
    # Built by hand: auto_decomposition never picks a full rank, which is not cheaper.
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 7, 3, padding=1).double()
    method = METHODS[method_name]
    factors = replacement(method, layer, method.full_ranks(layer))
    built = replacement_class(layer, method_name)(*factors, layer=layer)
    torch.testing.assert_close(built.weight, layer.weight.detach(), rtol=0, atol=1e-12)
    assert built.bias is built[-1].bias and torch.equal(built.bias, layer.bias)


def test_amcts_structures_answer_too():
    # AMCT's choice with its four orientations: out < in and kernel orders decide which comes first.
    torch.manual_seed(0)
    layers = [nn.Conv2d(256, 128, (3, 5), padding=(1, 2)), nn.Conv2d(128, 256, (5, 3), stride=2)]
    layers += [nn.Conv2d(256, 128, (5, 3), padding=(2, 0)), nn.Conv2d(128, 256, (3, 5), stride=(2, 1))]
    for layer in layers:  # FCFK, SCSK, FCSK, SCFK
        replacement = lowrank.auto_decomposition(nn.Sequential(nn.Sequential(layer)))[0][0][0]
        assert isinstance(replacement, SpatialConv2d)
        x = torch.randn(2, layer.in_channels, 12, 12)
        torch.testing.assert_close(as_dense(layer, replacement, x), replacement(x), rtol=1e-4, atol=1e-5)


def test_linear_and_embedding_as_msmodelslim_decomposes_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 32, padding_idx=0), nn.Linear(32, 48))
    decomposed = lowrank.Decompose(model).from_fixed(8, divisor=8).decompose_network()
    embedding, linear = decomposed
    assert isinstance(embedding, SVDEmbedding) and isinstance(linear, SVDLinear)
    assert (embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx) == (40, 32, 0)
    assert (linear.in_features, linear.out_features) == (32, 48)
    tokens = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(as_dense(model[0], embedding, tokens), embedding(tokens))
    x = torch.randn(3, 32)
    torch.testing.assert_close(as_dense(model[1], linear, x), linear(x))


def test_the_configuration_is_read_only_and_the_rest_is_not():
    replacement = decomposed_layer(nn.Conv2d(16, 16, 3, padding=1), method="spatial", rank=4, min_rank=1)
    with pytest.raises(AttributeError, match=r"SpatialConv2d.padding is read-only: .*\(padding=\(1, 1\)\)"):
        replacement.padding = (2, 2)
    with pytest.raises(AttributeError, match="SpatialConv2d.stride is read-only and cannot be deleted"):
        del replacement.stride
    assert replacement.padding == (1, 1)
    replacement.note = "anything else"  # ordinary attributes, modes and submodules behave as usual
    replacement.eval()
    assert replacement.note == "anything else" and not replacement.training


def test_weight_carries_gradients_to_the_factors():
    replacement = decomposed_layer(nn.Linear(12, 10), rank=3, min_rank=1)
    replacement.weight.square().sum().backward()
    assert all(module.weight.grad is not None for module in replacement)


def test_copies_and_pickles_keep_the_configuration_read_only():
    replacement = decomposed_layer(nn.Conv2d(16, 16, 3), method="tucker2", rank=[4, 4], min_rank=1)
    for copied in (copy.deepcopy(replacement), pickle.loads(pickle.dumps(replacement))):
        assert type(copied) is Tucker2Conv2d and copied.kernel_size == (3, 3)
        torch.testing.assert_close(copied.weight, replacement.weight)
        with pytest.raises(AttributeError, match="read-only"):
            copied.kernel_size = (1, 1)


def test_state_dict_keys_are_the_plain_sequentials():
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    decomposed, _ = lowrank.auto_decomposition(model, method="tucker2", ratio=0.5, min_rank=1)
    assert list(decomposed.state_dict()) == ["0.0.weight", "0.1.weight", "0.2.weight", "0.2.bias"] + [
        "2.0.weight",
        "2.1.weight",
        "2.1.bias",
    ]


@pytest.fixture(scope="module")
def exportable():
    """A decomposed conv and linear layer, and an input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    decomposed, _ = lowrank.auto_decomposition(model, method="spatial", ratio=0.5, min_rank=1)
    return decomposed.eval(), torch.randn(2, 8, 6, 6)


def test_torch_export_sees_only_the_factors(exportable):
    decomposed, x = exportable
    exported = torch.export.export(decomposed, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum("conv2d" in target for target in targets) == 2
    assert sum("linear" in target for target in targets) == 2
    torch.testing.assert_close(exported.module()(x), decomposed(x))


def test_onnx_export_is_plain_convolutions_and_matrix_products(exportable):
    decomposed, x = exportable
    program = torch.onnx.export(decomposed, (x,), dynamo=True, verbose=False)
    onnx.checker.check_model(program.model_proto)
    operators = [node.op_type for node in program.model_proto.graph.node]
    assert operators.count("Conv") == 2 and sum(op in ("Gemm", "MatMul") for op in operators) == 2, operators
    (output,) = ReferenceEvaluator(program.model_proto).run(None, {program.model_proto.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), decomposed(x), rtol=1e-4, atol=1e-5)
