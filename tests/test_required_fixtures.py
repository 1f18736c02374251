"""A test that needs what this machine may lack (the MNIST copy, DeepSpeed, the Slurm cluster) is
skipped without it, and an error instead under CI=true, so that a CI run never passes untested."""

import pytest

from tests.conftest import ROOT

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration  # pytest in a subprocess

MODULE = """
from tests.conftest import pytest_runtest_setup, requires  # the hook and the mark, as the suite uses them

@requires("no MNIST copy at /nowhere")
def test_missing():
    pass

@requires(None)
def test_present():
    pass
"""


@pytest.mark.parametrize("ci,outcome", [("true", {"errors": 1, "passed": 1}), ("", {"skipped": 1, "passed": 1})])
def test_a_missing_fixture_skips_or_fails_under_ci(pytester, monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest(MODULE.split("\n\n")[0])
    pytester.makepyfile(test_fixture=MODULE)
    result = pytester.runpytest_subprocess("-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(**outcome)
    reason = "no MNIST copy at /nowhere"
    result.stdout.fnmatch_lines([f"*{reason} (CI=true: a required fixture is missing*" if ci else f"SKIPPED*{reason}"])
