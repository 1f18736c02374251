"""Data-aware decomposition with lowrank's rules: ``auto_decomposition(..., calibration=batches)``."""

import copy
import json

import pytest
import torch
from torch import nn

import lowrank
from lowrank.calibration import digest
from lowrank.functional import output_weighted_factors


def anisotropic(batches, shape, seed=0):
    """Batches whose channels (axis 1) are strongly correlated and of decaying scale: the case where
    fitting the outputs beats fitting the weights."""
    channels = shape[0]
    mixing = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0))
    mixing *= torch.logspace(0, -2, channels)[:, None]
    generator = torch.Generator().manual_seed(seed)  # other samples of the same distribution
    result = []
    for _ in range(batches):
        values = torch.randn(16, *shape[1:], channels, generator=generator) @ mixing
        result.append(values.movedim(-1, 1).contiguous())
    return result


def output_error(dense, decomposed, inputs):
    with torch.no_grad():
        expected = dense(inputs)
        return ((decomposed(inputs) - expected).norm() / expected.norm()).item()


def composed_linear(sequential):
    return sequential[1].weight.double() @ sequential[0].weight.double()


def test_a_linear_layer_gets_the_closed_form_optimum_for_its_input_covariance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    batches = anisotropic(4, (12,))
    inputs = torch.cat(batches).double()
    covariance = inputs.T @ inputs / len(inputs)
    root = torch.linalg.cholesky(covariance)
    u, s, vt = torch.linalg.svd(model[0].weight.double() @ root)
    rank = 4
    optimum = (u[:, :rank] * s[:rank]) @ vt[:rank] @ torch.linalg.inv(root)

    decomposed, _ = lowrank.auto_decomposition(copy.deepcopy(model), rank=rank, min_rank=1, calibration=batches)
    torch.testing.assert_close(composed_linear(decomposed[0]), optimum, rtol=1e-5, atol=1e-6)
    weight_only, _ = lowrank.auto_decomposition(copy.deepcopy(model), rank=rank, min_rank=1)
    assert not torch.allclose(composed_linear(weight_only[0]), optimum, atol=1e-3)


@pytest.mark.parametrize(
    "layer, method, shape",
    [
        (nn.Conv2d(12, 16, 3, padding=1), "spatial", (12, 8, 8)),
        (nn.Conv2d(12, 16, (3, 5), stride=2), "spatial", (12, 9, 11)),  # horizontal first, strided, no padding
        (nn.Conv2d(16, 12, 3, padding="same"), "spatial", (16, 8, 8)),
        (nn.Conv2d(12, 16, 3, padding=1), "tucker2", (12, 8, 8)),
        (nn.Conv2d(12, 16, 3, padding=1), "svd", (12, 8, 8)),
        (nn.Conv2d(12, 16, 1), "svd", (12, 8, 8)),
        (nn.Linear(12, 16), "svd", (12,)),
    ],
    ids=["spatial", "spatial-horizontal-strided", "spatial-same", "tucker2", "svd-conv", "svd-1x1", "svd-linear"],
)
def test_data_aware_weights_cut_the_output_error_on_held_out_inputs(layer, method, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    calibration, held_out = anisotropic(4, shape), anisotropic(1, shape, seed=1)[0]
    options = {"method": method, "ratio": 0.4, "min_rank": 1}
    weight_only, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options)
    data_aware, _ = lowrank.auto_decomposition(copy.deepcopy(model), calibration=calibration, **options)
    assert [p.shape for p in data_aware.parameters()] == [p.shape for p in weight_only.parameters()]
    assert output_error(model, data_aware, held_out) < 0.9 * output_error(model, weight_only, held_out)


def test_output_weighted_factors_at_full_rank_are_exact_even_for_singular_inputs():
    weight = torch.randn(6, 8, dtype=torch.float64)
    inputs = torch.randn(100, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank 3 of 8
    left, right = output_weighted_factors(weight, weight @ (inputs.T @ inputs) @ weight.T, 6)
    torch.testing.assert_close(left @ right, weight)


class Branches(nn.Module):
    """A network with batch norm, keyword arguments and a layer that never runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)

    def forward(self, x, scale=1.0):
        return self.head(self.norm(self.conv(x)).mean((2, 3)) * scale)


def test_the_info_file_records_the_calibration_and_replays_without_it(tmp_path, lowrank_log):
    torch.manual_seed(0)
    model = Branches()
    batches = [{"x": x, "scale": 2.0} for x in anisotropic(3, (8, 6, 6))]
    read = []

    def stream():
        for batch in batches:
            read.append(batch)
            yield batch

    statistics = copy.deepcopy(model.norm.state_dict())
    info = tmp_path / "info.json"
    decomposed, changes = lowrank.auto_decomposition(
        model, info, ratio=0.5, min_rank=1, calibration=stream(), calibration_batches=2
    )
    assert len(read) == 2  # the cap is read, no more
    assert model.training and all(module.training for module in model.modules())
    torch.testing.assert_close(model.norm.state_dict(), statistics)  # eval mode: running statistics untouched
    assert set(changes) == {"conv", "head", "unused"}
    assert any("No calibration input reached unused" in message for message in lowrank_log)
    document = json.loads(info.read_text())
    assert document["policy"]["calibration"] == {"batches": 2, "sha256": digest(batches[:2])}
    calibrated = {layer["name"]: layer.get("calibrated", False) for layer in document["layers"]}
    assert calibrated == {"conv": True, "head": True, "unused": False}

    torch.manual_seed(1)
    replayed, _ = lowrank.decompose_network(Branches(), info)
    replayed.load_state_dict(decomposed.state_dict())
    inputs = anisotropic(1, (8, 6, 6), seed=2)[0]
    decomposed.eval(), replayed.eval()
    torch.testing.assert_close(replayed(inputs), decomposed(inputs))


def test_positional_batches_and_the_msmodelslim_interface_under_lowranks_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1))
    batches, held_out = anisotropic(3, (12, 8, 8)), anisotropic(1, (12, 8, 8), seed=1)[0]
    weight_only = lowrank.Decompose(model, method="spatial").from_ratio(0.4, divisor=1).decompose_network()
    data_aware = (
        lowrank.Decompose(model, method="spatial")
        .from_ratio(0.4, divisor=1)
        .decompose_network(datasets=[(x,) for x in batches], max_iter=2)
    )
    assert output_error(model, data_aware, held_out) < 0.9 * output_error(model, weight_only, held_out)


def test_bad_calibration_input_is_named():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="calibration: expected an iterable of model inputs.*got Tensor"):
        lowrank.auto_decomposition(model, ratio=0.5, calibration=torch.randn(2, 4))
    with pytest.raises(ValueError, match="calibration_batches caps the batches read from calibration="):
        lowrank.auto_decomposition(model, ratio=0.5, calibration_batches=2)
    with pytest.raises(ValueError, match="calibration_batches must be a positive int"):
        lowrank.auto_decomposition(model, ratio=0.5, calibration=[torch.randn(2, 4)], calibration_batches=0)
    with pytest.raises(ValueError, match="calibration: no batch was read"):
        lowrank.auto_decomposition(model, ratio=0.5, calibration=[])
    labelled = [[torch.randn(2, 4), torch.tensor([0, 1])]]  # a DataLoader's (input, label) pairs
    with pytest.raises(ValueError, match="the model does not run on batch 0 .*without the labels"):
        lowrank.auto_decomposition(model, ratio=0.5, calibration=labelled)
    assert isinstance(model[0], nn.Linear)  # nothing was decomposed
