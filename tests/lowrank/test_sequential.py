"""Sequential data-aware fitting: ``auto_decomposition(..., calibration=batches, sequential=True)``."""

import copy
import json

import pytest
import torch
from torch import nn

import lowrank
from lowrank import sequential as sequential_fits
from lowrank.sequential import compensated
from tests.lowrank.test_calibration import anisotropic, output_error


def test_the_compensated_map_is_the_weights_when_nothing_changed_the_inputs():
    torch.manual_seed(0)
    weight, inputs = torch.randn(5, 8), torch.randn(200, 8)
    moment = inputs.T @ inputs / len(inputs)
    torch.testing.assert_close(compensated(weight, moment, moment), weight.double())


def test_the_compensated_map_undoes_a_known_change_of_the_inputs(monkeypatch):
    """x̂ = A x: W* = W A⁻¹ maps x̂ to W x, up to the damping."""
    torch.manual_seed(0)
    weight, inputs = torch.randn(5, 8).double(), torch.randn(4000, 8).double()
    change = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, dtype=torch.float64)
    changed = inputs @ change.T
    cross, moment = inputs.T @ changed / len(inputs), changed.T @ changed / len(inputs)
    expected = inputs @ weight.T

    def error(mapped):
        return ((changed @ mapped.T - expected).norm() / expected.norm()).item()

    assert error(compensated(weight, cross, moment)) < 0.5 * error(weight)  # damped towards W
    monkeypatch.setattr(sequential_fits, "COMPENSATION_DAMPING", 0.0)
    torch.testing.assert_close(compensated(weight, cross, moment), weight @ torch.linalg.inv(change))


def deep(kind):
    """Layers in a row, batch norm (with the statistics of the calibration data) and ReLUs between
    them: the errors of the first layers reach the last, shifted and scaled."""
    torch.manual_seed(0)
    if kind == "linear":
        model, shape = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24)), (16,)
    else:
        first, norm = nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32)
        model, shape = nn.Sequential(first, norm, nn.ReLU(), nn.Conv2d(32, 16, 3, stride=2)), (8, 10, 10)
    batches = anisotropic(6, shape)
    with torch.no_grad():
        norm = model[1]
        norm.momentum = None  # the running statistics of every batch, as a trained model's
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        for batch in batches:
            model(batch)
    return model.eval(), shape, batches


@pytest.mark.parametrize(
    "method, kind, ratio",
    [
        ("spatial", "conv", 0.3),
        ("spatial", "conv", 0.15),
        ("tucker2", "conv", 0.3),
        ("svd", "conv", 0.15),
        ("svd", "linear", 0.15),
    ],
)
def test_fitting_layer_after_layer_cuts_the_models_output_error_on_held_out_inputs(method, kind, ratio):
    model, shape, batches = deep(kind)
    held_out = anisotropic(1, shape, seed=1)[0]
    options = {"method": method, "ratio": ratio, "min_rank": 1, "calibration": batches}
    one_pass, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options)
    sequential, changes = lowrank.auto_decomposition(copy.deepcopy(model), **options, sequential=True)
    assert list(changes) == ["0", "3"]
    assert [p.shape for p in sequential.parameters()] == [p.shape for p in one_pass.parameters()]  # the same ranks
    errors = output_error(model, one_pass, held_out), output_error(model, sequential, held_out)
    assert errors[1] < 0.99 * errors[0], errors


def test_the_first_layer_is_fitted_as_in_one_pass_and_the_others_correct_the_bias_too():
    model, _, batches = deep("conv")
    options = {"ratio": 0.3, "min_rank": 1, "calibration": batches}
    one_pass, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options)
    sequential, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options, sequential=True)
    for new, old in zip(sequential[0], one_pass[0]):
        torch.testing.assert_close(new.weight, old.weight)
    assert not torch.allclose(sequential[3][-1].bias, model[3].bias)  # compensated for the layer before


def test_the_info_file_says_so_and_replays_without_data(tmp_path):
    model, shape, batches = deep("conv")
    batches = iter(batches)  # read once, whatever the passes
    path = tmp_path / "info.json"
    decomposed, _ = lowrank.auto_decomposition(
        copy.deepcopy(model),
        str(path),
        ratio=0.3,
        min_rank=1,
        calibration=batches,
        calibration_batches=3,
        sequential=True,
    )
    record = json.loads(path.read_text())["policy"]["calibration"]
    assert record["batches"] == 3 and record["sequential"] is True
    replayed, _ = lowrank.decompose_network(copy.deepcopy(model), str(path))
    replayed.load_state_dict(decomposed.state_dict())
    inputs = anisotropic(1, shape, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(replayed(inputs), decomposed(inputs), rtol=0, atol=0)


def test_the_model_comes_back_unchanged_and_in_its_mode():
    model, shape, _ = deep("conv")
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    modules = dict(model.named_modules())
    planned = lowrank.plan.plan(
        model,
        lowrank.policy.RankPolicy(ratio=0.3, min_rank=1, calibration=anisotropic(2, shape), sequential=True),
        "spatial",
        True,
        "test",
    )
    assert len(planned.replacements) == 2 and all(r.calibrated for r in planned.replacements)
    assert dict(model.named_modules()) == modules and all(module.training for module in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_sequential_needs_calibration_data():
    model, _, _ = deep("linear")
    with pytest.raises(ValueError, match="sequential=True .* give calibration="):
        lowrank.auto_decomposition(model, ratio=0.3, sequential=True)
    with pytest.raises(ValueError, match="sequential must be True or False"):
        lowrank.auto_decomposition(model, ratio=0.3, calibration=[torch.zeros(1, 16)], sequential="yes")


def test_a_layer_too_wide_to_compensate_is_fitted_to_the_inputs_it_gets(monkeypatch):
    model, shape, batches = deep("linear")  # the second Linear: svd fitted to its outputs (32 in, 24 out)
    held_out = anisotropic(1, shape, seed=1)[0]
    options = {"ratio": 0.15, "min_rank": 1, "calibration": batches}
    compensated_fit, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options, sequential=True)
    monkeypatch.setattr(sequential_fits, "MAX_WIDTH", 32)  # 32 inputs and the bias's 1
    narrow, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options, sequential=True)
    one_pass, _ = lowrank.auto_decomposition(copy.deepcopy(model), **options)
    assert torch.equal(narrow[3][-1].bias, model[3].bias)  # not compensated
    assert not torch.equal(narrow[3][0].weight, one_pass[3][0].weight)  # but fitted to x̂
    errors = [output_error(model, fitted, held_out) for fitted in (compensated_fit, narrow, one_pass)]
    assert errors[0] < errors[1] < errors[2], errors


class Residual(nn.Module):
    """A residual block that adds in place: the inputs the hooks saw change after the layer ran."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        return hidden.add_(self.second(hidden))


def test_layers_see_their_inputs_as_they_were_called_whatever_the_forward_does_in_place():
    torch.manual_seed(0)
    in_place = Residual()
    out_of_place = copy.deepcopy(in_place)
    out_of_place.forward = lambda x: (lambda h: h + out_of_place.second(h))(torch.relu(out_of_place.first(x)))
    batches = anisotropic(4, (16,))
    options = {"ratio": 0.3, "min_rank": 1, "calibration": batches, "sequential": True}
    fitted = [lowrank.auto_decomposition(model, **options)[0].second for model in (in_place, out_of_place)]
    for new, reference in zip(*fitted):
        torch.testing.assert_close(new.weight, reference.weight)
    torch.testing.assert_close(fitted[0][-1].bias, fitted[1][-1].bias)


class Routed(nn.Module):
    """A layer applied to the rows its input routes to it: the decomposed model calls it on other rows."""

    def __init__(self):
        super().__init__()
        self.first, self.expert = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        hidden = self.first(x)
        return self.expert(hidden[hidden[:, -1] > 0])  # a feature that the decomposed first layer changes


def test_a_layer_called_otherwise_in_the_decomposed_model_is_fitted_to_the_inputs_it_gets(lowrank_log):
    torch.manual_seed(0)
    model = Routed()
    batches = anisotropic(4, (16,))
    decomposed, changes = lowrank.auto_decomposition(
        copy.deepcopy(model), ratio=0.3, min_rank=1, calibration=batches, sequential=True
    )
    assert list(changes) == ["first", "expert"]
    expected = "'expert' is fitted to its inputs without correcting for the layers before it: its calls differ"
    assert any(message.startswith(expected) for message in lowrank_log)
    assert torch.equal(decomposed.expert[-1].bias, model.expert.bias)


def test_the_batches_kept_in_memory_need_a_cap_unless_they_are_a_list():
    model, shape, batches = deep("linear")
    with pytest.raises(ValueError, match="give calibration_batches=N .* of this generator, or a list"):
        lowrank.auto_decomposition(model, ratio=0.3, calibration=(batch for batch in batches), sequential=True)
    assert all(not isinstance(module, nn.Sequential) for module in model.children())  # left whole
    lowrank.auto_decomposition(model, ratio=0.3, calibration=iter(batches), calibration_batches=2, sequential=True)


def test_decompose_fits_layer_after_layer_with_its_datasets_and_its_config_file(tmp_path):
    model, shape, batches = deep("conv")
    expected, _ = lowrank.auto_decomposition(
        copy.deepcopy(model), method="tucker2", ratio=0.3, min_rank=1, calibration=batches, sequential=True
    )
    direct = lowrank.Decompose(model).from_ratio(0.3, divisor=1, min_rank=1, ratio_of="flops", sequential=True)
    path = tmp_path / "config.json"
    saved = lowrank.Decompose(model, config_file=str(path)).from_ratio(
        0.3, divisor=1, min_rank=1, ratio_of="flops", sequential=True, calibration=batches
    )
    for decomposed in (direct.decompose_network(datasets=batches), saved.decompose_network()):
        for key, value in expected.state_dict().items():
            torch.testing.assert_close(decomposed.state_dict()[key], value, msg=key)
    budgeted = tmp_path / "budget.json"  # a budget's plan reads the data, and its config file records how
    budget = {"budget": 0.5, "example_input": batches[0][:1], "min_rank": 1, "divisor": 1}
    lowrank.Decompose(model, config_file=str(budgeted)).from_dict({}, **budget, sequential=True, calibration=batches)
    assert json.loads(budgeted.read_text())["policy"]["calibration"]["sequential"] is True
