"""Data-aware decomposition with lowrank's rules: ``auto_decomposition(..., calibration=batches)``."""

import copy
import json

import pytest
import torch
from torch import nn

import lowrank
from lowrank import calibration, functional
from lowrank.calibration import calibrate, digest
from lowrank.functional import weighted_factors
from lowrank.methods import METHODS, kernel_rows


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


@pytest.mark.parametrize("features", [(12, 10), (6, 16)], ids=["from-outputs", "from-inputs"])
def test_a_linear_layer_gets_the_closed_form_optimum_for_its_input_covariance(features, monkeypatch):
    """Without damping, the closed form [W L]_r L^-1 (L the Cholesky factor of the input covariance), from
    the outputs' second moment or, with fewer inputs than outputs, from the inputs'."""
    monkeypatch.setattr(functional, "DAMPING", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(*features))
    batches = anisotropic(4, features[:1])
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


def test_weighted_factors_at_full_rank_are_exact_even_for_singular_inputs():
    weight = torch.randn(6, 8, dtype=torch.float64)
    inputs = torch.randn(100, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank 3 of 8
    moment = inputs.T @ inputs
    for given in ({"output_moment": weight @ moment @ weight.T}, {"input_moment": moment}):
        left, right = weighted_factors(weight, 6, **given)
        torch.testing.assert_close(left @ right, weight)


def test_directions_the_calibration_data_never_excite_are_fitted_as_the_weights_have_them():
    """Inputs in a 4-dimensional subspace, rank 8: the damping fits the other 4 directions to the
    weights, where an undamped fit would take arbitrary ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    subspace = torch.randn(4, 32)
    batches = [torch.randn(32, 4) @ subspace for _ in range(2)]
    decomposed, _ = lowrank.auto_decomposition(copy.deepcopy(model), rank=8, min_rank=1, calibration=batches)
    weight_only, _ = lowrank.auto_decomposition(copy.deepcopy(model), rank=8, min_rank=1)
    in_subspace, anywhere = torch.randn(64, 4) @ subspace, torch.randn(64, 32)
    assert output_error(model, decomposed, in_subspace) < 1e-2
    assert output_error(model, decomposed, anywhere) < 1.2 * output_error(model, weight_only, anywhere)


def test_large_calls_are_sampled_at_random_positions_and_weighted_by_their_size(monkeypatch):
    """A regular stride through (image, row, column) positions would see the same columns of every
    image: here only the first, whose channels differ from the others'."""
    monkeypatch.setattr(calibration, "MAX_ROWS", 512)
    layer = nn.Conv2d(4, 8, 3, padding=1)
    images = torch.randn(32, 4, 8, 8)
    images[..., 0] *= 4  # the first column of every image
    small = 100 * torch.randn(1, 4, 2, 2)  # a call of 4 rows, which must weigh 4 against 2048
    moment = calibrate(nn.Sequential(layer), {"0": (layer, METHODS["tucker2"])}, [images, small]).moments["0"]
    rows = torch.cat([images.movedim(1, -1).reshape(-1, 4), small.movedim(1, -1).reshape(-1, 4)]).double()
    expected = rows.T @ rows / len(rows)
    assert (moment - expected).norm() < 0.15 * expected.norm()


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
    assert document["policy"]["calibration"] == {"batches": 2, "sha256": digest(batches[:2]), "sequential": False}
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


def test_a_failure_to_gather_statistics_is_not_blamed_on_the_batch(monkeypatch):
    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(METHODS["svd"], "calibration_rows", fail)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"the statistics of '0' could not be gathered \(RuntimeError: out of memory"):
        lowrank.auto_decomposition(model, rank=2, min_rank=1, calibration=[torch.randn(2, 4)])
    assert isinstance(model[0], nn.Linear) and not model[0]._forward_hooks


def test_the_digest_reads_the_keys_of_keyword_batches():
    x, mask = torch.zeros(2), torch.ones(2)
    assert digest([{"x": x, "mask": mask}]) != digest([{"mask": x, "x": mask}])


def test_decompose_with_a_config_file_fits_the_data_and_every_process_builds_the_same_budget(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    batches, held_out = anisotropic(3, (12, 8, 8)), anisotropic(1, (12, 8, 8), seed=1)[0]
    options = {"divisor": 1, "min_rank": 1}
    fitted = lowrank.Decompose(model, tmp_path / "a.json", method="spatial").from_ratio(
        0.4, calibration=iter(batches), **options
    )
    weight_only = lowrank.Decompose(model, tmp_path / "b.json", method="spatial").from_ratio(0.4, **options)
    assert output_error(model, fitted.decompose_network(), held_out) < 0.9 * output_error(
        model, weight_only.decompose_network(), held_out
    )
    budget = {"budget": 0.4, "example_input": held_out[:1], **options}
    weights = lowrank.Decompose(model, method="spatial").from_dict({}, **budget).decompose_network(datasets=batches)
    structure = lowrank.Decompose(model, method="spatial").from_dict({}, **budget)
    structure = structure.decompose_network(do_decompose_weight=False, datasets=batches)
    assert [p.shape for p in structure.parameters()] == [p.shape for p in weights.parameters()]


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 5, 3, padding=(2, 1), padding_mode="circular", dilation=2),
        nn.Conv2d(3, 5, (3, 5), padding=2, padding_mode="replicate", stride=(2, 1)),
        nn.Conv2d(3, 5, 2, padding="same"),
        nn.Conv2d(3, 5, 4, padding="same", dilation=(1, 2)),
        nn.Conv2d(3, 5, 3, padding="valid", stride=2),
    ],
    ids=["reflect", "circular-dilated", "replicate-strided", "same-even", "same-even-dilated", "valid"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # PyTorch's, on the conv itself
def test_the_rows_a_kernel_reads_are_the_convs_own_windows(layer):
    """Each padding mode and "same" with an even kernel (its larger half after the input): the rows times
    the kernel are the conv's outputs, which the svd moments and the sequential fits rely on."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        expected = layer(inputs) - layer.bias[:, None, None]
        rows = kernel_rows(layer, inputs) @ layer.weight.reshape(5, -1).T
    torch.testing.assert_close(rows, expected.movedim(1, -1).reshape(-1, 5))
