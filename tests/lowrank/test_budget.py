"""The model-level budget: ``auto_decomposition(model, budget=0.3, example_input=x)``."""

import copy
import json

import pytest
import torch
from torch import nn

import lowrank
from lowrank.budget import Option, allocate

EXAMPLE = torch.zeros(1, 3, 16, 16)


class Deep(nn.Module):
    """Four 3x3 convs with batch norm and a classifier: layers of different cost and spectra."""

    def __init__(self):
        super().__init__()
        widths = [3, 32, 48, 64, 64]
        self.features = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())
                for a, b in zip(widths, widths[1:])
            )
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture
def deep():
    torch.manual_seed(0)
    return Deep()


def flops(model):
    return lowrank.count_flops(model, EXAMPLE)


@pytest.mark.parametrize("budget", [0.5, 0.3, 0.15])
def test_the_budget_is_met_in_multiply_adds_and_replays_bit_identically(deep, tmp_path, budget):
    dense = flops(deep)
    info = tmp_path / "info.json"
    decomposed, changes = lowrank.auto_decomposition(copy.deepcopy(deep), info, budget=budget, example_input=EXAMPLE)
    assert changes
    assert flops(decomposed) <= budget * dense
    assert flops(decomposed) > 0.8 * budget * dense  # the budget is spent, not wasted
    document = json.loads(info.read_text())
    assert document["policy"]["rule"] == f"budget={budget}"
    assert document["policy"]["allocation"] == {"budget": budget, "dense_macs": dense, "macs": flops(decomposed)}

    again, _ = lowrank.auto_decomposition(copy.deepcopy(deep), budget=budget, example_input=EXAMPLE)
    for (name, ours), theirs in zip(decomposed.state_dict().items(), again.state_dict().values()):
        assert torch.equal(ours, theirs), name
    replayed, _ = lowrank.decompose_network(Deep(), info)
    replayed.load_state_dict(decomposed.state_dict())
    assert flops(replayed) == flops(decomposed)
    inputs = torch.randn(2, 3, 16, 16)
    decomposed.eval(), replayed.eval()
    assert torch.equal(replayed(inputs), decomposed(inputs))


def test_the_budget_cuts_where_the_error_is_smallest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():  # the first layer is nearly of rank 4: cutting it costs almost nothing
        model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) + 1e-3 * torch.randn(64, 64))
    example = torch.zeros(1, 64)
    decomposed, changes = lowrank.auto_decomposition(model, budget=0.6, min_rank=1, example_input=example)
    assert list(changes) == ["0"]
    assert decomposed[0][0].out_features <= 8


def test_the_budget_composes_with_exclude_layers_and_divisor(deep, tmp_path):
    dense = flops(deep)
    info = tmp_path / "info.json"
    decomposed, changes = lowrank.auto_decomposition(
        copy.deepcopy(deep),
        info,
        budget=0.4,
        divisor=8,
        exclude=["fc"],
        layers={r"features\.3\.0": {"rank": 16}},
        example_input=EXAMPLE,
    )
    assert "fc" not in changes
    document = json.loads(info.read_text())
    ranks = {layer["name"]: layer["ranks"] for layer in document["layers"]}
    assert ranks["features.3.0"] == [16]
    assert all(rank % 8 == 0 for name, layer_ranks in ranks.items() for rank in layer_ranks)
    assert flops(decomposed) <= 0.4 * dense


def test_a_data_aware_budget_records_its_calibration(deep, tmp_path):
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    info = tmp_path / "info.json"
    decomposed, _ = lowrank.auto_decomposition(
        copy.deepcopy(deep), info, budget=0.3, example_input=EXAMPLE, calibration=batches
    )
    document = json.loads(info.read_text())
    assert document["policy"]["calibration"]["batches"] == 2
    assert all(layer["calibrated"] for layer in document["layers"])
    assert flops(decomposed) <= 0.3 * flops(deep)


def test_budget_errors(deep):
    with pytest.raises(ValueError, match="budget needs example_input"):
        lowrank.auto_decomposition(deep, budget=0.3)
    with pytest.raises(ValueError, match="budget is for the whole model"):
        lowrank.auto_decomposition(deep, layers={"fc": {"budget": 0.3}}, example_input=EXAMPLE)
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        lowrank.auto_decomposition(deep, budget=1.5, example_input=EXAMPLE)
    with pytest.raises(ValueError, match="budget=0.01: decomposing every layer it covers at its smallest ranks"):
        lowrank.auto_decomposition(deep, budget=0.01, example_input=EXAMPLE)
    # No layer left to the budget: what the others do must still meet it.
    with pytest.raises(ValueError, match="budget=0.5: .* leaves 1.000 of the dense model's multiply-adds"):
        lowrank.auto_decomposition(deep, budget=0.5, exclude=[".*"], example_input=EXAMPLE)
    with pytest.raises(ValueError, match="budget=0.1: .* leaves 0.[2-9]"):
        lowrank.auto_decomposition(deep, budget=0.1, layers={r"features\.3\.0": {"rank": 48}}, example_input=EXAMPLE)
    assert isinstance(deep.fc, nn.Linear)  # nothing was decomposed


def test_allocate_takes_the_cheapest_error_per_multiply_add_first():
    options = {
        "flat": [Option(None, 100, 0.0), Option((2,), 50, 0.5), Option((1,), 25, 0.8)],
        "steep": [Option(None, 100, 0.0), Option((2,), 50, 0.05), Option((1,), 25, 0.1)],
    }
    chosen = allocate(options, 75)
    assert chosen["steep"].ranks == (1,) and chosen["flat"].ranks is None
    chosen = allocate(options, 40)  # one step of 50 is enough; its slack of 10 buys nothing back
    assert chosen["steep"].ranks == (2,) and chosen["flat"].ranks is None
    chosen = allocate(options, 100)  # steep to (1,), flat to (2,) save 125: steep gets rank 2 back
    assert chosen["steep"].ranks == (2,) and chosen["flat"].ranks == (2,)
    with pytest.raises(ValueError, match="can save 150 multiply-adds at most, 160 needed"):
        allocate(options, 160)
