"""lowrank.auto_decomposition called as AMCT calls it: AMCT's layers, ranks, modes, weights and info
file, from the worked values and formats of ../shared/peers/SPEC.md Part A."""

import json
import math

import pytest
import torch
import torchvision
from torch import nn

import lowrank
from launch.mnist import Net
from lowrank import functional_peers as peers

# SPEC A.4's worked ranks for random-initialised layers (EVBMF estimates 0, so the band decides).
WORKED_RANKS = [
    ((64, 64, 3), 32),
    ((128, 128, 3), 64),
    ((128, 256, 3), 64),
    ((256, 256, 3), 160),
    ((512, 512, 3), 304),
    ((3, 64, 7), 16),
    ((48, 32, 7), 32),
    ((64, 64, 5), 48),
]


@pytest.mark.parametrize("shape,rank", WORKED_RANKS, ids=[f"{i}-{o}-{k}x{k}" for (i, o, k), _ in WORKED_RANKS])
def test_amcts_worked_ranks(shape, rank):
    in_channels, out_channels, kernel = shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel))
    model, changes = lowrank.auto_decomposition(model)
    assert changes == {"0": ["0.0", "0.1"]}
    assert model[0][0].out_channels == rank


def test_the_amct_samples_conv2_record(tmp_path, lowrank_log):
    path = tmp_path / "info.json"
    model, changes = lowrank.auto_decomposition(Net(), str(path))
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    record = {
        "ori_layer_info": {
            "name": "conv2",
            "in_channels": 128,
            "out_channels": 128,
            "kernel_size": [3, 3],
            "stride": [1, 1],
            "dilation": [1, 1],
            "groups": 1,
        },
        "mode": "SCFK",
        "decom_nodes": {"first": {"weight_shape": [64, 128, 3, 1]}, "last": {"weight_shape": [128, 64, 1, 3]}},
    }
    assert path.read_text() == json.dumps([record], indent="\t")  # AMCT's own layout, tab-indented
    assert f"Decomposition information file is saved to: {path.resolve()}" in lowrank_log
    # AMCT's own decompose_network reads name, shapes and mode; ours rebuilds the same model from it.
    rebuilt, replayed = lowrank.decompose_network(Net(), str(path))
    assert replayed == changes
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(rebuilt(x), model(x))
    lowrank.auto_decomposition(Net(), str(path))
    assert f"File {path.resolve()} already exists and will be overwritten." in lowrank_log


# (in, out, kh, kw) -> mode, the first and last weight shapes at rank r (SPEC A.3, A.5).
MODES = [
    ((128, 64, 3, 5), "FCFK", lambda r: ((r, 128, 1, 5), (64, r, 3, 1))),
    ((128, 64, 5, 3), "FCSK", lambda r: ((r, 128, 5, 1), (64, r, 1, 3))),
    ((64, 128, 3, 5), "SCFK", lambda r: ((r, 64, 3, 1), (128, r, 1, 5))),
    ((64, 128, 5, 3), "SCSK", lambda r: ((r, 64, 1, 3), (128, r, 5, 1))),
]


@pytest.mark.parametrize("shape,mode,shapes", MODES, ids=[mode for _, mode, _ in MODES])
def test_the_four_modes_and_their_weights(shape, mode, shapes, tmp_path):
    in_channels, out_channels, kh, kw = shape
    torch.manual_seed(0)
    layer = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=2, padding=(kh // 2, kw // 2), bias=True)
    model, _ = lowrank.auto_decomposition(nn.Sequential(layer), str(tmp_path / "info.json"))
    first, last = model[0]
    (record,) = json.loads((tmp_path / "info.json").read_text())
    assert record["mode"] == mode
    rank = first.out_channels
    assert (tuple(first.weight.shape), tuple(last.weight.shape)) == shapes(rank)
    # The vertical conv keeps the height's stride and padding, the horizontal one the width's.
    vertical, horizontal = (first, last) if first.kernel_size[1] == 1 else (last, first)
    assert (vertical.stride, vertical.padding) == ((2, 1), (kh // 2, 0))
    assert (horizontal.stride, horizontal.padding) == ((1, 2), (0, kw // 2))
    assert first.bias is None and torch.equal(last.bias, layer.bias)
    # The composed kernel is the exact rank-r truncation of AMCT's matrix (computed here by an SVD).
    matrix = peers.amct_matrix(layer.weight, mode)
    u, s, vh = torch.linalg.svd(matrix)
    expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
    x = torch.randn(2, in_channels, 9, 11)
    dense = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=2, padding=(kh // 2, kw // 2)).double()
    with torch.no_grad():
        dense.weight.copy_(_unrearrange(expected, mode, layer.weight.shape))
        dense.bias.copy_(layer.bias)
    torch.testing.assert_close(model.double()(x.double()), dense(x.double()), rtol=1e-6, atol=1e-6)
    # The orthonormal factor sits on the smaller-channel side.
    small = (first if mode.startswith("SC") else last).weight.double()
    basis = small.reshape(rank, -1) if mode.startswith("SC") else small.permute(0, 2, 3, 1).reshape(-1, rank).T
    torch.testing.assert_close(basis @ basis.T, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-5)


def _unrearrange(matrix, mode, shape):
    """The (Cout, Cin, kh, kw) kernel whose AMCT matrix is ``matrix``."""
    out_channels, in_channels, kh, kw = shape
    cmax, cmin = max(out_channels, in_channels), min(out_channels, in_channels)
    kmin, kmax = min(kh, kw), max(kh, kw)
    tensor = matrix.reshape(cmin, kmin, cmax, kmax).permute(2, 0, 1, 3)  # [a, b, p, q]
    if mode.endswith("SK"):
        tensor = tensor.transpose(2, 3)
    if mode.startswith("FC"):
        tensor = tensor.transpose(0, 1)
    return tensor


def test_amcts_candidates_and_skip_rules(lowrank_log):
    model = nn.ModuleDict(
        {
            "ok": nn.Conv2d(64, 64, 3),
            "stem": nn.Conv2d(3, 64, 7, stride=2),  # 7x7 kernels qualify with 3 channels
            "two_channels": nn.Conv2d(2, 64, 7),  # 7 * 2 < 16
            "narrow": nn.Conv2d(32, 64, 3),  # a 3x3 needs 64 channels on each side
            "dilated": nn.Conv2d(64, 64, 3, dilation=2),
            "grouped": nn.Conv2d(64, 64, 3, groups=2),
            "pointwise": nn.Conv2d(64, 64, 1),
            "strip": nn.Conv2d(64, 64, (1, 3)),
            "stride3": nn.Conv2d(64, 64, 3, stride=3),
            "linear": nn.Linear(256, 256),
            "lazy": nn.LazyConv2d(64, 3),
        }
    )
    _, changes = lowrank.auto_decomposition(model)
    assert list(changes) == ["ok", "stem"]
    processed = [line for line in lowrank_log if line.startswith("Processing")]
    assert processed == [f"Processing: {name!r}" for name in model if name != "linear"]  # every Conv2d


def test_resnet_stem_and_no_linear_or_pointwise_layer():
    torch.manual_seed(0)
    model, changes = lowrank.auto_decomposition(torchvision.models.resnet18())
    assert "conv1" in changes and "fc" not in changes
    assert all(name.endswith(("conv1", "conv2")) for name in changes)
    assert len(changes) == 17  # the stem and the 16 3x3 convs; no 1x1 downsample


class PlainSubclass(nn.Conv2d):
    pass


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_subclasses_and_tied_weights_as_amct(tmp_path):
    torch.manual_seed(0)
    tied_a, tied_b = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    tied_b.weight = tied_a.weight  # biases stay separate
    model = nn.Sequential(PlainSubclass(64, 64, 3, padding=1), OwnForward(64, 64, 3, padding=1), tied_a, tied_b)
    x = torch.randn(1, 64, 8, 8)
    model, changes = lowrank.auto_decomposition(model, str(tmp_path / "info.json"))
    assert list(changes) == ["0", "2", "3"]
    assert type(model[0][0]) is nn.Conv2d and isinstance(model[1], OwnForward)
    assert model[2][0].weight is model[3][0].weight and model[2][1].weight is model[3][1].weight
    assert model[2][1].bias is not model[3][1].bias
    rebuilt, _ = lowrank.decompose_network(
        nn.Sequential(PlainSubclass(64, 64, 3, padding=1), OwnForward(64, 64, 3, padding=1), *_tied_pair()),
        str(tmp_path / "info.json"),
    )
    assert rebuilt[2][0].weight is rebuilt[3][0].weight  # the replay keeps them tied
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))


def _tied_pair():
    first, second = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    second.weight = first.weight
    return first, second


def test_unsupported_dtypes_are_warned_about_and_invalid_weights_abort(lowrank_log):
    model = nn.Sequential(nn.Conv2d(64, 64, 3).to(torch.bfloat16), nn.Conv2d(64, 64, 3).half())
    model, changes = lowrank.auto_decomposition(model)
    assert list(changes) == ["1"] and model[1][0].weight.dtype == torch.float16
    assert "Unsupported data type torch.bfloat16 of layer '0', ignored." in lowrank_log
    broken = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 1))  # a 1x1 AMCT would skip: still checked
    with torch.no_grad():
        broken[1].weight[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="weight tensor contains invalid number\\(inf or nan\\)"):
        lowrank.auto_decomposition(broken)
    assert all(isinstance(layer, nn.Conv2d) for layer in broken)


def test_same_padding_which_amct_refuses_is_kept():
    layer = nn.Conv2d(64, 64, 3, padding="same")
    model, _ = lowrank.auto_decomposition(nn.Sequential(layer))
    x = torch.randn(1, 64, 10, 12)
    assert model(x).shape == (1, 64, 10, 12)


def test_evbmf_moves_the_rank_inside_amcts_band():
    torch.manual_seed(0)
    # 256 -> 256 3x3: the band is [768 // 5, 768 // 4] = [153, 192]; a rank-100 kernel plus a little noise
    # has an EVBMF estimate of 100, clamped to 153 -> 160; one of rank 180 stays 180 -> 176.
    for true_rank, expected in ((100, 160), (180, 176)):
        matrix = torch.randn(768, true_rank) @ torch.randn(true_rank, 768) + 0.01 * torch.randn(768, 768)
        values = torch.linalg.svdvals(matrix.double())
        assert peers.amct_evbmf_rank(values, 768, 768) == true_rank
        assert peers.amct_rank(values, 768, 768, 256)[0] == expected


def test_lowranks_own_keywords_keep_lowranks_rules_and_info_file(tmp_path):
    model, changes = lowrank.auto_decomposition(Net(), str(tmp_path / "info.json"), ratio=0.3)
    assert json.loads((tmp_path / "info.json").read_text())["format"] == "lowrank-decompose-info"
    assert model.conv2[0].out_channels == 57  # the ratio rule's rank, not AMCT's 64


def test_zeroed_filters_keep_amcts_svd_values():
    # Pruned filters: an SVD leaves their values at rounding level, where a Gram matrix's eigenvalues
    # would be exact zeros (EVBMF's free energy infinite, the estimate arbitrary).
    torch.manual_seed(0)
    layer = nn.Conv2d(121, 131, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("or,rikl->oikl", torch.randn(131, 40), torch.randn(40, 121, 3, 3)))
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))
        layer.weight[::3] = 0
    matrix = peers.amct_matrix(layer.weight, "SCFK")
    values = torch.linalg.svdvals(matrix)
    assert values.min() > 0  # rounding level, not 0
    model, _ = lowrank.auto_decomposition(nn.Sequential(layer))
    assert model[0][0].out_channels == peers.amct_rank(values, *matrix.shape, 121)[0]
