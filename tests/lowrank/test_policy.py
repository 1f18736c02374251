import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank.methods import METHODS, dense_cost
from lowrank.policy import DEFAULT_RATIO, RankPolicy, Rule


def ranks_of(model, name):
    """The ranks of a decomposed layer, read off its new modules."""
    return [
        module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        for module in model.get_submodule(name)
    ][:-1]


def test_default_cuts_seed_conv2_and_leaves_conv1_alone(net):
    conv2_input = torch.randn(1, 128, 26, 26)
    dense_flops = lowrank.count_flops(net.conv2, conv2_input)
    net, changes = lowrank.auto_decomposition(net)
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    assert isinstance(net.conv1, nn.Conv2d) and isinstance(net.fc, nn.Linear)
    assert dense_flops / lowrank.count_flops(net.conv2, conv2_input) >= 2.5


@pytest.mark.parametrize("ratio_of", ["flops", "params"])
@pytest.mark.parametrize("method", ["svd", "spatial", "tucker2"])
def test_ratio_gives_the_largest_ranks_within_budget(method, ratio_of):
    layer = nn.Conv2d(48, 64, 3, stride=2)
    policy = RankPolicy(ratio=0.4, ratio_of=ratio_of, min_rank=1)
    ranks, _ = policy.choose_ranks(METHODS[method], layer, policy.default)
    field = "macs" if ratio_of == "flops" else "params"
    cost = getattr(METHODS[method].cost(layer, ranks), field)
    assert cost <= 0.4 * getattr(dense_cost(layer), field)
    if len(ranks) == 1:
        assert getattr(METHODS[method].cost(layer, (ranks[0] + 1,)), field) > 0.4 * getattr(dense_cost(layer), field)


def test_fixed_rank():
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 48, 3))
    model, _ = lowrank.auto_decomposition(model, method="tucker2", rank=(8, 12))
    assert ranks_of(model, "0") == [8, 12] and ranks_of(model, "1") == [8, 12]
    model, _ = lowrank.auto_decomposition(nn.Sequential(nn.Linear(64, 64)), rank=16)
    assert ranks_of(model, "0") == [16]


def test_fixed_rank_of_the_wrong_length_is_reported(lowrank_log):
    lowrank.auto_decomposition(nn.Sequential(nn.Conv2d(32, 32, 3)), rank=(4, 4))
    assert any("rank (4, 4) gives 2 ranks, spatial needs 1 (rank)" in line for line in lowrank_log)


def test_energy_keeps_the_asked_energy():
    torch.manual_seed(0)
    layer = nn.Linear(128, 96)
    policy = RankPolicy(energy=0.6, min_rank=1)
    (rank,), _ = policy.choose_ranks(METHODS["svd"], layer, policy.default)
    values = torch.linalg.svdvals(layer.weight.detach().double()).square()
    kept = values.cumsum(0) / values.sum()
    assert kept[rank - 1] >= 0.6 > kept[rank - 2]


def test_vbmf_finds_a_planted_rank():
    torch.manual_seed(0)
    layer = nn.Linear(300, 200)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 12) @ torch.randn(12, 300) + 0.3 * torch.randn(200, 300))
    model, _ = lowrank.auto_decomposition(nn.Sequential(layer), vbmf=True)
    assert ranks_of(model, "0") == [12]


def test_divisor_rounds_ratio_down_and_energy_up():
    layer = nn.Conv2d(64, 64, 3)
    for rule, check in ((dict(ratio=0.3), "down"), (dict(energy=0.5), "up")):
        plain = RankPolicy(**rule)
        rounded = RankPolicy(**rule, divisor=8)
        (r,), _ = plain.choose_ranks(METHODS["spatial"], layer, plain.default)
        (r8,), _ = rounded.choose_ranks(METHODS["spatial"], layer, rounded.default)
        assert r8 % 8 == 0
        assert (r8 <= r) if check == "down" else (r8 >= r)


def test_a_ratio_budget_below_the_divisor_leaves_the_layer_alone():
    layer = nn.Linear(256, 256)
    policy = RankPolicy(ratio=0.02, divisor=16, min_rank=1)  # the budget allows rank 2
    ranks, reason = policy.choose_ranks(METHODS["svd"], layer, policy.default)
    assert ranks is None and reason == "ratio=0.02 gives rank 2, below divisor 16"
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, bias=False))
    _, changes = lowrank.auto_decomposition(conv, method="spatial", ratio=0.3, ratio_of="params", divisor=32)
    assert changes == {}  # the budget allows rank 28: rounding up to 32 would break it


@pytest.mark.parametrize(
    "layer,method,ratio_of",
    [
        (nn.Linear(64, 64), "svd", "flops"),  # at ratio 1 the budget allows rank 32, as costly as the layer
        (nn.Conv2d(32, 32, 3, stride=2, padding=1), "tucker2", "params"),  # the first 1x1 runs before the stride
    ],
)
def test_ratio_takes_the_largest_ranks_within_budget_that_are_cheaper(layer, method, ratio_of):
    """A budget that allows ranks no cheaper than the layer (in MACs, for a budget in parameters)
    takes the largest cheaper ones, found here by trying every step; it once left the layer alone."""
    method = METHODS[method]
    policy = RankPolicy(ratio=1.0 if method.name == "svd" else 0.8, ratio_of=ratio_of, min_rank=1)
    dense, full = dense_cost(layer), method.full_ranks(layer)
    measured = "macs" if ratio_of == "flops" else "params"
    best = None
    for step in range(1, max(full) + 1):
        ranks = tuple(max(1, round(step * f / max(full))) for f in full)
        cost = method.cost(layer, ranks)
        within = getattr(cost, measured) <= policy.ratio * getattr(dense, measured)
        if within and cost.params < dense.params and cost.macs < dense.macs:
            best = ranks
    assert best is not None
    assert policy.choose_ranks(method, layer, policy.default) == (best, "")


def test_energy_rounds_up_only_where_the_full_rank_reaches_the_divisor():
    """msModelSlim's divisor 64 would round a rank-4 layer of full rank 48 up to 48 (no cheaper), a
    tucker2 input rank of full rank 32 up to 32 (a useless 1x1 conv), and rank 70 of full rank 96 to 96."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 1024)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1024, 4) @ torch.randn(4, 48))
    policy = RankPolicy(energy=0.99, divisor=64, min_rank=1)
    assert policy.choose_ranks(METHODS["svd"], linear, policy.default) == ((4,), "")
    conv = nn.Conv2d(32, 128, 3)
    with torch.no_grad():
        core = torch.randn(16, 8, 3, 3)
        conv.weight.copy_(torch.einsum("os,sjkl,ji->oikl", torch.randn(128, 16), core, torch.randn(8, 32)))
    assert policy.choose_ranks(METHODS["tucker2"], conv, policy.default) == ((8, 64), "")
    with torch.no_grad():  # full rank 96, at least one divisor: rank 70 would round up past it, to full rank
        linear = nn.Linear(96, 1024)
        linear.weight.copy_(torch.randn(1024, 70) @ torch.randn(70, 96))
    policy = RankPolicy(energy=0.999999, divisor=64, min_rank=1)
    assert policy.choose_ranks(METHODS["svd"], linear, policy.default) == ((70,), "")


def test_layers_dict_and_exclusions():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3)),
        nn.Sequential(nn.Conv2d(32, 32, 3), nn.Linear(64, 64)),
    )
    layers = {r"0\.0": {"rank": 4}, r"0\..*": 0.5, r"1\.0": None, r"1\.1": {"rank": 8}}
    model, changes = lowrank.auto_decomposition(model, layers=layers, exclude=[r"1\.1"])
    assert set(changes) == {"0.0", "0.1"}  # 1.0 left alone by None, 1.1 excluded
    assert ranks_of(model, "0.0") == [4]


def test_expressions_that_match_no_layer_are_warned_about(lowrank_log):
    """A typo in a key or an exclusion selects or excludes nothing: the warning names it."""
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Sequential(nn.Linear(64, 64)))
    lowrank.auto_decomposition(model, layers={"conv_typo": 0.3, r"1\.0": 0.3}, exclude=["1", "0"])
    warnings = [line for line in lowrank_log if "matches no" in line]
    assert warnings == [
        f"{what} matches no conv or linear layer (expressions match whole names, such as '1.0')"
        for what in ("layers key 'conv_typo'", "exclude '1'")
    ]


def test_layers_alone_select_only_those_layers():
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
    _, changes = lowrank.auto_decomposition(model, layers={"1": 0.3})
    assert list(changes) == ["1"]


def test_layers_with_a_global_rule_override_it():
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
    model, changes = lowrank.auto_decomposition(model, ratio=0.3, layers={"1": {"rank": 6, "method": "tucker2"}})
    assert list(changes) == ["0", "1"] and len(model[1]) == 3 and ranks_of(model, "1") == [6, 6]


def test_min_rank_leaves_thin_layers_alone(lowrank_log):
    model = nn.Sequential(nn.Linear(1000, 10))
    lowrank.auto_decomposition(model, ratio=0.5)
    assert any("below min_rank 8" in line for line in lowrank_log)
    _, changes = lowrank.auto_decomposition(model, ratio=0.5, min_rank=1)
    assert list(changes) == ["0"]


def test_not_cheaper_is_reported(lowrank_log):
    model = nn.Sequential(nn.Linear(32, 32))
    _, changes = lowrank.auto_decomposition(model, rank=20)
    assert not changes
    assert any("rank 20 is not cheaper (params 1024 -> 1280" in line for line in lowrank_log)


def test_default_rule():
    assert RankPolicy().default == Rule("ratio", DEFAULT_RATIO)
    assert RankPolicy(layers={"x": 1}).default is None


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(ratio=0.3, energy=0.9), "give at most one of rank, .*, budget; got ratio, energy"),
        (dict(ratio=0), r"ratio must be a number in \(0, 1\]"),
        (dict(ratio=1.5), r"ratio must be a number in \(0, 1\]"),
        (dict(energy="high"), r"energy must be a number in \(0, 1\]"),
        (dict(rank=0), "rank must be a positive int"),
        (dict(rank=[4, "a"]), "rank must be a positive int"),
        (dict(ratio_of="time"), "ratio_of must be one of flops, params"),
        (dict(divisor=0), "divisor must be a positive int"),
        (dict(min_rank=2.5), "min_rank must be a positive int"),
        (dict(exclude=["("]), "exclude: invalid regular expression '\\('"),
        (dict(layers={"[": 1}), "layers: invalid regular expression"),
        (dict(layers={"a": "big"}), r"layers\['a'\]: expected a rank, a ratio, \"vbmf\", a dict or None"),
        (dict(layers={"a": {"ratio": 0.5, "rank": 3}}), r"layers\['a'\]: expected exactly one of"),
        (dict(vbmf="yes"), "vbmf must be True"),
        (dict(layers={"nothing.*": {"ratio": 0.5, "method": "cp"}}), r"layers\['nothing.\*'\]: unknown method 'cp'"),
        (dict(layers=["conv2"]), r"layers must be a dict of regular expression -> rule, got \['conv2'\]"),
        (dict(layers={"fc": 0}), r"layers\['fc'\]: rank must be a positive int"),
        (dict(exclude=5), "exclude must be a regular expression or a list of them, got 5"),
        (dict(exclude=[re.compile("0")]), "exclude: expected a regular expression as a string"),
        (dict(layers={re.compile("0"): 1}), "layers: expected a regular expression as a string"),
        (dict(ratio=np.bool_(True)), r"ratio must be a number in \(0, 1\]"),
    ],
)
def test_invalid_policies_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        RankPolicy(**options)


def test_numpy_numbers_are_accepted_and_recorded_as_python_ones():
    policy = RankPolicy(layers={"a": np.float32(0.5), "b": {"rank": np.int64(4)}}, divisor=np.int64(8), exclude=None)
    assert policy.rule_for("a")[0] == Rule("ratio", 0.5) and policy.rule_for("b")[0] == Rule("rank", 4)
    assert type(policy.divisor) is int and policy.exclude == []
    json.dumps(policy.describe())
    assert RankPolicy(ratio=np.float32(0.25)).default == Rule("ratio", 0.25)


def test_unknown_keyword_lists_the_valid_ones(net):
    with pytest.raises(ValueError, match="unknown policy option.*ratios.*valid options: method, rank, ratio"):
        lowrank.auto_decomposition(net, ratios=0.5)
    with pytest.raises(ValueError, match="valid methods: spatial, tucker2, svd"):
        lowrank.auto_decomposition(net, method="cp")


@pytest.mark.parametrize("method", ["svd", "spatial", "tucker2"])
def test_latency_candidates_are_the_cheaper_ranks_from_min_rank_rounded_to_divisor(method):
    layer = nn.Conv2d(48, 64, 3)
    policy = RankPolicy(latency=0.5, example_input=torch.randn(1, 48, 8, 8), divisor=4)
    candidates = policy.candidate_ranks(METHODS[method], layer)
    dense, full = dense_cost(layer), METHODS[method].full_ranks(layer)
    assert candidates == sorted(set(candidates)) and len(candidates) > 3
    for ranks in candidates:
        cost = METHODS[method].cost(layer, ranks)
        assert cost.params < dense.params and cost.macs < dense.macs
        assert all(r % 4 == 0 and r >= 8 for r in ranks)
    larger = tuple(min(r + 4, f) for r, f in zip(candidates[-1], full))
    assert METHODS[method].cost(layer, larger).macs >= dense.macs or (
        METHODS[method].cost(layer, larger).params >= dense.params
    )
