import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowrank
from lowrank.cli import main


def test_inspect_prints_a_table_with_totals_and_skips(net, tmp_path, capsys):
    path = tmp_path / "info.json"
    lowrank.auto_decomposition(net, path, ratio=0.3)  # lowrank's info file, which records the skipped layers
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    (layer,) = json.loads(path.read_text())["layers"]
    rank = layer["ranks"][0]
    assert "layer" in out and "method" in out and "MACs/pos" in out
    row = next(line for line in out.splitlines() if line.startswith("conv2 "))
    assert row.split()[:5] == ["conv2", "spatial", str(rank), "147,456", f"{768 * rank:,}"]
    assert "total (1 layer)" in out
    assert "skipped 'conv1'" in out and "skipped 'fc'" in out


def test_inspect_reads_amct_info_files(tmp_path, capsys):
    """AMCT's info file (what auto_decomposition writes without a policy keyword): the costs come from
    the recorded shapes and strides, and match the modules that were built."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 64, 3, stride=2, padding=1))
    dense_params = {name: conv.weight.numel() for name, conv in model.named_children() if isinstance(conv, nn.Conv2d)}
    path = tmp_path / "amct.json"
    decomposed, changes = lowrank.auto_decomposition(model, path)  # in place
    assert isinstance(json.loads(path.read_text()), list) and list(changes) == ["0", "2"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    positions = {}  # output positions of each conv on an input the strides divide
    hooks = [
        conv.register_forward_hook(lambda conv, args, output: positions.update({conv: output[0, 0].numel()}))
        for conv in decomposed.modules()
        if isinstance(conv, nn.Conv2d)
    ]
    decomposed(torch.randn(1, 64, 16, 16))
    for hook in hooks:
        hook.remove()
    for name in changes:
        dense, new = dense_params[name], decomposed.get_submodule(name)
        rank, params = new[0].out_channels, sum(conv.weight.numel() for conv in new)
        macs = sum(conv.weight.numel() * positions[conv] for conv in new) // positions[new[-1]]
        row = next(line for line in out.splitlines() if line.startswith(f"{name} ")).split()
        assert row[:5] == [name, "spatial", str(rank), f"{dense:,}", f"{params:,}"]
        assert row[6:8] == [f"{dense:,}", f"{macs:,}"]
    assert "total (2 layers)" in out and "skipped" not in out  # AMCT's file records no skipped layers


def test_inspect_reads_msmodelslim_config_files(net, tmp_path, capsys):
    path = tmp_path / "config.json"
    lowrank.Decompose(net, config_file=path).from_ratio(0.3, divisor=1)
    config = json.loads(path.read_text())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for name, value in config.items():
        hidden = " x ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert next(line for line in out.splitlines() if line.startswith(f"{name} ")).split() == [name, *hidden.split()]
    assert f"msModelSlim config file: {len(config)} layer(s)" in out


def test_inspect_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.json")]) == 2
    assert "lowrank: error: decomposition info file not found" in capsys.readouterr().err
    amct = tmp_path / "amct.json"
    amct.write_text("[]")  # an AMCT file of no layers: an empty table
    assert main(["inspect", str(amct)]) == 0
    assert "total (0 layers)" in capsys.readouterr().out
    amct.write_text("[{}]")
    assert main(["inspect", str(amct)]) == 2
    assert "an AMCT record is incomplete or malformed: KeyError('ori_layer_info')" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text('{"format": "other"}')
    assert main(["inspect", str(other)]) == 2
    assert "not a decomposition info file (format is 'other'" in capsys.readouterr().err
    other.write_text('"text"')
    assert main(["inspect", str(other)]) == 2
    assert "expected a JSON object (lowrank, msModelSlim) or list (AMCT), got str" in capsys.readouterr().err


def test_inspect_reads_odd_but_valid_json_without_a_traceback(net, tmp_path, capsys):
    path = tmp_path / "info.json"
    lowrank.auto_decomposition(net, path, ratio=0.3)
    document = json.loads(path.read_text())
    document.update(policy=[], skipped=[1, {"name": "fc"}])
    document["layers"][0]["latency"] = {"dense_seconds": 0, "decomposed_seconds": 0.001}
    path.write_text(json.dumps(document))
    assert main(["inspect", str(path)]) == 0
    assert "skipped 1" in capsys.readouterr().out
    document["layers"].append(1)
    path.write_text(json.dumps(document))
    assert main(["inspect", str(path)]) == 2
    assert "layers[1] must be an object, got 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": None}, "the record of layers[0] is incomplete or malformed"),
        ({"method": {}}, "the record of layer 'conv2' is incomplete or malformed"),
        ({"params": [10**400, 1]}, "the record of layer 'conv2' is incomplete or malformed: OverflowError"),
    ],
)
def test_inspect_names_a_malformed_record(net, tmp_path, capsys, change, message):
    path = tmp_path / "info.json"
    lowrank.auto_decomposition(net, path, ratio=0.3)
    document = json.loads(path.read_text())
    document["layers"][0].update(change)
    path.write_text(json.dumps(document))
    assert main(["inspect", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_inspect_of_deeply_nested_json(tmp_path, capsys):
    path = tmp_path / "info.json"
    path.write_text("[" * 100000 + "]" * 100000)
    assert main(["inspect", str(path)]) == 2
    assert "nested too deeply" in capsys.readouterr().err


@pytest.mark.integration
def test_console_script_is_installed(net, tmp_path):
    path = tmp_path / "info.json"
    lowrank.auto_decomposition(net, path)
    result = subprocess.run(
        [sys.executable, "-m", "lowrank.cli", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "conv2" in result.stdout
