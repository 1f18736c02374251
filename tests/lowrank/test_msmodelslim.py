"""lowrank.Decompose side by side with the real msModelSlim (its PyPI package runs on a CPU): the same
configuration, config file, structures, state_dict keys, weights and errors for msModelSlim's own calls."""

import json
import logging
import os
import stat

import numpy as np
import pytest
import torch
import torchvision
from msmodelslim.pytorch import low_rank_decompose as msmodelslim
from torch import nn

import lowrank
import lowrank.functional_peers as peers

logging.getLogger("msmodelslim").setLevel(logging.WARNING)  # its Tucker routine logs every layer


class LrdSampleNetwork(nn.Module):
    """msModelSlim's test network: Embedding, Linear, a 3x3 and a 1x1 Conv2d, three Linear layers."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 64))
        self.feature = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 64, 1))
        self.inner = nn.Linear(1600, 512)
        self.classifier = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 10))

    def forward(self, tokens):
        x = self.embedding(tokens)  # (B, 25, 64)
        x = self.feature(x.transpose(1, 2).reshape(-1, 64, 5, 5))
        return self.classifier(self.inner(x.flatten(1)))


def sample_network():
    torch.manual_seed(0)
    return LrdSampleNetwork()


TOKENS = torch.randint(0, 16, (4, 25), generator=torch.Generator().manual_seed(1))
# SPEC.md B.4's reference values, which the real msModelSlim gives too.
CALLS = [
    ("from_ratio", (0.5,), {}, {"feature.0": (64, 64), "inner": 192, "classifier.0": 128}),
    (
        "from_ratio",
        (0.5,),
        {"divisor": 16},
        {"embedding.1": 16, "feature.0": (64, 64), "feature.2": (32, 32), "inner": 192, "classifier.0": 80},
    ),
    (
        "from_ratio",
        (0.5,),
        {"excludes": ["inner", "classifier.0"], "divisor": 3},
        {"embedding.0": 6, "embedding.1": 9, "feature.0": (54, 54), "feature.2": (18, 18), "classifier.1": 6},
    ),
    (
        "from_fixed",
        (13,),
        {"divisor": 16},
        {"embedding.1": 16, "feature.0": (16, 16), "feature.2": (16, 16), "inner": 16, "classifier.0": 16},
    ),
    (
        "from_dict",
        ({"feature.0": (12, 12), "feature.2": (31, 13), "inner": 11},),
        {"divisor": 16},
        {"feature.0": (16, 16), "feature.2": (32, 16), "inner": 16},
    ),
    ("from_dict", ({"feature": 0.5, "inn": "VBMF"},), {}, None),  # re.search: "feature" matches feature.0
    ("from_vbmf", (), {"excludes": ["classifier.1"], "divisor": 8}, None),
]


def both(model, call, args, kwargs, config_file=None):
    ours = getattr(lowrank.Decompose(model, config_file=config_file and str(config_file[0])), call)(*args, **kwargs)
    theirs = getattr(msmodelslim.Decompose(model, config_file=config_file and str(config_file[1])), call)(
        *args, **kwargs
    )
    return ours, theirs


def composed(first, core, last):
    """The dense kernel of a 1x1 -> k x k -> 1x1 replacement."""
    return torch.einsum("oa,abhw,bi->oihw", last[:, :, 0, 0], core, first[:, :, 0, 0])


def assert_same_weights(ours, theirs, config, factor_rtol):
    """Every state_dict entry: Linear and Embedding factors from the same LAPACK SVD bit for bit, Tucker
    factors (an iteration in float32) within ``factor_rtol`` of the largest entry. Where a hidden size
    exceeds what the other side spans (32 from a 1x1 conv's 16), the extra columns meet a zero core and
    are any completion of the basis: there the composed kernels are compared."""
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    for key, value in reference.items():
        assert mine[key].shape == value.shape, key
        prefix, index, _ = key.rsplit(".", 2) if key.count(".") >= 2 else ("", "", "")
        if value.dim() != 4 or not isinstance(config.get(prefix), tuple):  # not a Tucker factor
            assert torch.equal(mine[key], value), key
            continue
        core = reference[f"{prefix}.1.weight"]
        hidden_out, hidden_in, kh, kw = core.shape
        if hidden_out <= hidden_in * kh * kw and hidden_in <= hidden_out * kh * kw:
            tolerance = factor_rtol * value.abs().max().item()
            torch.testing.assert_close(mine[key], value, rtol=0, atol=tolerance, msg=key)
        elif index == "0":
            parts = [f"{prefix}.{position}.weight" for position in range(3)]
            expected = composed(*(reference[part] for part in parts))
            torch.testing.assert_close(
                composed(*(mine[part] for part in parts)), expected, rtol=0, atol=factor_rtol * expected.abs().max()
            )


@pytest.mark.parametrize("call,args,kwargs,expected", CALLS)
def test_msmodelslims_calls_give_its_configuration_structure_and_weights(call, args, kwargs, expected, tmp_path):
    model = sample_network()
    files = (tmp_path / "ours.json", tmp_path / "theirs.json")
    ours, theirs = both(model, call, args, kwargs, files)
    assert ours.decompose_config == theirs.decompose_config
    if expected is not None:
        assert ours.decompose_config == expected
    # The config file: the same bytes, for the owner only, and each tool reads the other's.
    assert files[0].read_text() == files[1].read_text()
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
    assert msmodelslim.Decompose(model, str(files[0])).from_file().decompose_config == json.loads(files[1].read_text())
    assert lowrank.Decompose(model, str(files[1])).from_file().decompose_config == json.loads(files[0].read_text())
    decomposed, reference = ours.decompose_network(), theirs.decompose_network()
    assert_same_weights(decomposed, reference, ours.decompose_config, factor_rtol=1e-3)
    torch.testing.assert_close(decomposed(TOKENS), reference(TOKENS), rtol=1e-4, atol=1e-5)
    # The other processes' structure, from the config file, takes msModelSlim's weights as they are.
    structure = lowrank.Decompose(sample_network(), str(files[1])).from_file().decompose_network(False)
    structure.load_state_dict(reference.state_dict())
    assert torch.equal(structure(TOKENS), reference(TOKENS))


@pytest.mark.parametrize(
    "datasets",
    [
        # Each first element has enough positions (100) for a full-rank statistic of the 64-channel conv,
        # whose input factor divides by its eigenvalues (float32 noise would dominate a singular one).
        [(TOKENS,), (TOKENS[2:],), (TOKENS[:3],)],  # positional arguments
        [{"tokens": TOKENS}, {"tokens": TOKENS[3:]}],  # keyword arguments
    ],
    ids=["tuples", "dicts"],
)
@pytest.mark.parametrize("max_iter", [-1, 1])
def test_data_aware_decomposition_gives_msmodelslims_weights(datasets, max_iter):
    model = sample_network()
    ours, theirs = both(model, "from_ratio", (0.5,), {"divisor": 16})
    decomposed = ours.decompose_network(datasets=datasets, max_iter=max_iter)
    reference = theirs.decompose_network(datasets=datasets, max_iter=max_iter)
    plain = ours.decompose_network()
    # Linear factors bit for bit (the same statistics, the same LAPACK calls); convs, whose input
    # factor is mapped back by 1/eigenvalue, through their outputs.
    for key in ("inner.0.weight", "inner.1.weight", "classifier.0.0.weight", "embedding.1.1.weight"):
        assert torch.equal(decomposed.state_dict()[key], reference.state_dict()[key]), key
    torch.testing.assert_close(decomposed(TOKENS), reference(TOKENS), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(decomposed(TOKENS), plain(TOKENS))  # the data changed the weights
    # msModelSlim's own purpose: a smaller error on the data than the weights-only decomposition.
    dense = model(TOKENS)
    assert (decomposed(TOKENS) - dense).norm() < (plain(TOKENS) - dense).norm()


def test_a_bare_tensor_is_one_positional_argument_where_msmodelslim_skips_the_statistics():
    ours, theirs = both(sample_network(), "from_ratio", (0.5,), {"divisor": 16})
    bare = ours.decompose_network(datasets=[TOKENS])
    assert torch.equal(bare(TOKENS), ours.decompose_network(datasets=[(TOKENS,)])(TOKENS))
    skipped = theirs.decompose_network(datasets=[TOKENS])  # logs an error and decomposes without data
    assert torch.allclose(skipped(TOKENS), theirs.decompose_network()(TOKENS))


def test_statistics_leave_the_model_and_its_modes_as_they_were():
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Dropout(0.5), nn.Linear(64, 64)).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    decomposed = lowrank.Decompose(model).from_fixed(8, divisor=8).decompose_network(datasets=[(torch.randn(16, 32),)])
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert model.training and decomposed.training and decomposed[1].training
    assert decomposed[1].num_batches_tracked == 0  # statistics collected in eval mode


def test_resnet18_configurations_match_msmodelslim():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for call, args, kwargs in [
        ("from_ratio", (0.5,), {}),
        ("from_ratio", (0.3,), {"divisor": 16, "excludes": ["conv1", "fc"]}),
        ("from_fixed", (100,), {"divisor": 1}),
        ("from_dict", ({r"layer[34]\..*conv": 0.25, "fc": 64},), {"divisor": 32}),
    ]:
        ours, theirs = both(model, call, args, kwargs)
        assert ours.decompose_config == theirs.decompose_config, (call, kwargs)
    config = lowrank.Decompose(model).from_ratio(0.5).decompose_config
    assert len(config) == 12  # the issue's figure: msModelSlim's parameter budget keeps 12 layers


@pytest.mark.slow
def test_resnet18_weights_and_outputs_match_msmodelslim():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    ours, theirs = both(model, "from_ratio", (0.5,), {})
    decomposed, reference = ours.decompose_network().eval(), theirs.decompose_network().eval()
    # Random weights have close singular values, where float32 iterations part a little more.
    assert_same_weights(decomposed, reference, ours.decompose_config, factor_rtol=1e-2)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(decomposed(x), reference(x), rtol=1e-3, atol=1e-4)


BAD_CALLS = [
    (lambda d: d.from_ratio(1.0), ValueError),
    (lambda d: d.from_ratio(0.0), ValueError),
    (lambda d: d.from_ratio(1), ValueError),
    (lambda d: d.from_ratio(0.5, excludes="inner"), ValueError),
    (lambda d: d.from_ratio(0.5, excludes=["inner", 3]), ValueError),
    (lambda d: d.from_ratio(0.5, divisor=0), ValueError),
    (lambda d: d.from_ratio(0.5, divisor="8"), ValueError),
    (lambda d: d.from_fixed(16.0), ValueError),
    (lambda d: d.from_fixed(0), ValueError),
    (lambda d: d.from_dict({}), ValueError),
    (lambda d: d.from_dict([("inner", 8)]), ValueError),
    (lambda d: d.from_dict({"(": 8}), ValueError),
    (lambda d: d.from_dict({"nothing": 8}), ValueError),  # an empty configuration
    (lambda d: d.from_file(), ValueError),
    (lambda d: d.decompose_network(), ValueError),
    (lambda d: d.from_fixed(16).decompose_network(do_decompose_weight="False"), TypeError),
    (lambda d: d.from_fixed(16).decompose_network(max_iter=1.0), TypeError),
    (lambda d: d.from_fixed(16).decompose_network(max_iter=-2), ValueError),
]


@pytest.mark.parametrize("call,error", BAD_CALLS)
def test_bad_input_raises_what_msmodelslim_raises(call, error):
    for tool in (lowrank, msmodelslim):
        with pytest.raises(error):
            call(tool.Decompose(sample_network()))


def test_bad_construction_raises_what_msmodelslim_raises():
    for tool in (lowrank, msmodelslim):
        with pytest.raises(ValueError, match="Provided network is not a torch.nn.Module"):
            tool.Decompose("resnet18")
        for config_file in ("ranks.txt", 3):
            with pytest.raises(ValueError, match="Parameter config_file is not a valid json file name"):
                tool.Decompose(sample_network(), config_file=config_file)


def test_where_msmodelslim_fails_the_layer_is_left_alone_with_a_reason(lowrank_log):
    model = nn.Sequential(nn.Conv2d(512, 64, 3), nn.Conv2d(64, 64, 3, groups=4))
    decomposer = lowrank.Decompose(model).from_fixed(100, divisor=1)
    assert decomposer.decompose_config == {"0": (100, 100)}  # more than 64 outputs: msModelSlim crashes
    assert isinstance(decomposer.decompose_network()[0], nn.Conv2d)
    assert any("hidden channels (100, 100) exceed the layer's channels (64, 512)" in line for line in lowrank_log)
    decomposed = lowrank.Decompose(model).from_fixed(8, divisor=8).decompose_network()
    assert isinstance(decomposed[1], nn.Conv2d) and len(decomposed[0]) == 3
    assert any("grouped convolution (groups=4)" in line for line in lowrank_log)


def test_a_layer_given_as_the_model_is_decomposed_and_returned():
    linear = nn.Linear(64, 64)
    decomposed = lowrank.Decompose(linear).from_ratio(0.25, divisor=8).decompose_network()
    assert [type(module) for module in decomposed] == [nn.Linear, nn.Linear] and isinstance(linear, nn.Linear)


def test_dtype_and_device_of_the_layer_are_kept():
    model = sample_network().double()
    decomposed = lowrank.Decompose(model).from_ratio(0.5).decompose_network()
    assert all(param.dtype == torch.float64 for param in decomposed.parameters())
    torch.testing.assert_close(decomposed(TOKENS), model(TOKENS), rtol=0.5, atol=1.0)  # runs in float64


def test_config_files_with_characters_msmodelslim_refuses_are_refused(tmp_path):
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"inner;rm": 8}))
    with pytest.raises(ValueError, match="characters msModelSlim's config files refuse"):
        lowrank.Decompose(sample_network(), str(path)).from_file()
    path.write_text(json.dumps({"inner": 8.5}))
    with pytest.raises(ValueError, match="hidden channels must be a positive int"):
        lowrank.Decompose(sample_network(), str(path)).from_file()


def test_decompose_network_replays_msmodelslims_config_file(tmp_path):
    path = tmp_path / "ranks.json"
    decomposed = msmodelslim.Decompose(sample_network(), str(path)).from_ratio(0.5, divisor=16).decompose_network()
    structure, changes = lowrank.decompose_network(sample_network(), path)
    assert changes["feature.0"] == ["feature.0.0", "feature.0.1", "feature.0.2"]
    structure.load_state_dict(decomposed.state_dict())
    assert torch.equal(structure(TOKENS), decomposed(TOKENS))
    path.write_text(json.dumps({"feature.9": [16, 16]}))
    with pytest.raises(lowrank.DecomposeInfoError, match="'feature.9' is not a Linear, Embedding or Conv2d"):
        lowrank.decompose_network(sample_network(), path)


def test_odd_but_valid_inputs_as_msmodelslim():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    model.add_module("format", nn.Linear(256, 256))  # a layer named as our info file's key
    for value in (np.float32(0.25), np.int64(32)):  # NumPy scalars other than float64: not valid values
        ours, theirs = both(model, "from_dict", ({"0": value, "1": 64},), {"divisor": 8})
        assert ours.decompose_config == theirs.decompose_config == {"1": 64}
    for tool in (lowrank, msmodelslim):
        with pytest.raises(TypeError):
            tool.Decompose(model).from_dict({1: 3})


def test_a_layer_named_format_reads_back(tmp_path):
    model = nn.Sequential()
    model.add_module("format", nn.Linear(256, 256))
    path = str(tmp_path / "ranks.json")
    lowrank.Decompose(model, path).from_ratio(0.5)
    assert lowrank.Decompose(model, path).from_file().decompose_config == {"format": 64}


@pytest.mark.parametrize(
    "zeroed,scale", [(False, 1.0), (True, 1.0), (False, 1e-4)], ids=["planted-rank", "pruned-filters", "tiny-weights"]
)
def test_vbmf_ranks_of_structured_weights_match_msmodelslim(zeroed, scale):
    # Random weights give VBMF ranks below any divisor; planted ranks under noise give informative
    # ones. Pruned filters leave values at rounding level, which only msModelSlim's own SVD reproduces;
    # tiny weights meet its 1e-6 guard on divisions.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(96, 120, 3), nn.Flatten(), nn.Linear(120, 200))
    with torch.no_grad():
        for layer, planted in ((model[0], 24), (model[2], 16)):
            shape = layer.weight.shape
            low_rank = torch.randn(shape[0], planted) @ torch.randn(planted, shape[1:].numel())
            layer.weight.copy_(scale * (low_rank.reshape(shape) + 0.05 * torch.randn(shape)))
            if zeroed:
                layer.weight[::4] = 0
    ours, theirs = both(model, "from_vbmf", (), {"divisor": 1})
    assert ours.decompose_config == theirs.decompose_config
    assert all(value not in (1, (1, 1)) for value in ours.decompose_config.values())  # informative ranks


def test_vbmf_free_energy_is_msmodelslims_with_its_division_guard():
    from msmodelslim.common.low_rank_decompose import vbmf

    values = np.linalg.svd(np.random.default_rng(0).normal(size=(40, 90)).astype(np.float32), compute_uv=False)
    rows, cols, alpha = 40, 90, 40 / 90
    x_bound = (1 + 2.5129 * np.sqrt(alpha)) * (1 + alpha / (2.5129 * np.sqrt(alpha)))
    params = vbmf.EvbSigma2Params(low=rows, median=cols, svd_ss=values, residual=0, inner_thresh=x_bound)
    for sigma2 in (1.0, 1e-3, 1e-9):  # the last below the guard: 90 * sigma2 < 1e-6
        ours = peers._evb_free_energy(sigma2, values.astype(np.float64) ** 2, rows, cols, x_bound, 0, floor=1e-6)
        assert ours == pytest.approx(vbmf.evb_sigma2(sigma2, params), rel=1e-6)
