"""compare_runs.py on results it cannot use: an error naming the file, and no half-printed table."""

import json
import runpy

import pytest

from tests.conftest import RECIPES

RESULTS = {"mode": "baseline", "accuracy": 0.5, "loss": 0.7, "params": 100, "flops": 1000, "steps": 2}


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"mode": "baseline", "loss', "cannot be read: "),
        ('{"mode": "baseline"}', "is not the results of a run: it has no accuracy, loss, params, flops"),
        ("[1, 2]", "is not the results of a run: it has no mode, accuracy, loss, params, flops"),
    ],
)
def test_a_bad_results_file_is_named_before_the_table(text, message, tmp_path, capsys):
    recipe = runpy.run_path(str(RECIPES / "compare_runs.py"))
    for run, content in (("good", json.dumps(RESULTS)), ("bad", text)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(content)
    with pytest.raises(SystemExit) as error:
        recipe["main"](recipe["get_args_parser"]().parse_args([str(tmp_path / "good"), str(tmp_path / "bad")]))
    assert str(error.value).startswith(f"error: {tmp_path / 'bad' / 'results.json'} {message}")
    assert capsys.readouterr().out == ""


def test_runs_whose_flops_were_counted_on_other_inputs_are_refused(tmp_path, capsys):
    """ResNet's FLOPs grow with --image-size: a 64-pixel run would look 12x cheaper than a 224-pixel one."""
    recipe = runpy.run_path(str(RECIPES / "compare_runs.py"))
    shapes = {"large": [1, 3, 224, 224], "small": [1, 3, 64, 64], "old": None, "same": [1, 3, 224, 224]}
    for run, shape in shapes.items():
        (tmp_path / run).mkdir()
        results = RESULTS if shape is None else {**RESULTS, "flops_input_shape": shape}  # old: written before
        (tmp_path / run / "results.json").write_text(json.dumps(results))

    def compare(*runs):
        recipe["main"](recipe["get_args_parser"]().parse_args([str(tmp_path / run) for run in runs]))
        return capsys.readouterr().out

    with pytest.raises(SystemExit) as error:
        compare("large", "old", "small")
    assert str(error.value) == (
        f"error: the runs' FLOPs were counted on inputs of different sizes ({tmp_path / 'large'} on 1x3x224x224, "
        f"{tmp_path / 'small'} on 1x3x64x64): compare runs of one size"
    )
    assert capsys.readouterr().out == ""
    assert compare("large", "old", "same").count("1.00x") == 6


def test_a_diverged_runs_loss_is_shown_as_not_finite(tmp_path, capsys):
    """The runner writes a NaN loss as null (strict JSON)."""
    recipe = runpy.run_path(str(RECIPES / "compare_runs.py"))
    for run, loss in (("good", 0.7), ("diverged", None)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps({**RESULTS, "loss": loss}))
    recipe["main"](recipe["get_args_parser"]().parse_args([str(tmp_path / "good"), str(tmp_path / "diverged")]))
    good, diverged = capsys.readouterr().out.splitlines()[1:]
    assert "0.700000" in good
    assert " not finite " in diverged
