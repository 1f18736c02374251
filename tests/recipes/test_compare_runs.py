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
