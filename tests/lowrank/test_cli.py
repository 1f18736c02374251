import json
import subprocess
import sys

import pytest

import lowrank
from lowrank.cli import main


def test_inspect_prints_a_table_with_totals_and_skips(net, tmp_path, capsys):
    path = tmp_path / "info.json"
    lowrank.auto_decomposition(net, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    (layer,) = json.loads(path.read_text())["layers"]
    rank = layer["ranks"][0]
    assert "layer" in out and "method" in out and "MACs/pos" in out
    row = next(line for line in out.splitlines() if line.startswith("conv2 "))
    assert row.split()[:5] == ["conv2", "spatial", str(rank), "147,456", f"{768 * rank:,}"]
    assert "total (1 layer)" in out
    assert "skipped 'conv1'" in out and "skipped 'fc'" in out


def test_inspect_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.json")]) == 2
    assert "lowrank: error: decomposition info file not found" in capsys.readouterr().err
    amct = tmp_path / "amct.json"
    amct.write_text("[]")
    assert main(["inspect", str(amct)]) == 2
    assert "an AMCT info file records no costs" in capsys.readouterr().err


def test_inspect_reads_odd_but_valid_json_without_a_traceback(net, tmp_path, capsys):
    path = tmp_path / "info.json"
    lowrank.auto_decomposition(net, path)
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
    lowrank.auto_decomposition(net, path)
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
