"""launch raises; the recipes' one entry point, ``launch.entry.run_main``, ends the process."""

import ast
import subprocess
import sys

import pytest

from launch.entry import PREEMPTED_EXIT_CODE, Preempted, RunError, run_main
from tests.conftest import ENV, ROOT


def raising(error):
    def main(*args):
        raise error

    return main


@pytest.mark.parametrize(
    "main,code,stderr",
    [
        (lambda *args: None, 0, ""),
        (raising(RunError("--data-path x does not exist")), 1, "error: --data-path x does not exist\n"),
        (raising(Preempted()), PREEMPTED_EXIT_CODE, ""),
    ],
    ids=["done", "run-error", "preempted"],
)
def test_run_main_turns_the_outcome_into_the_exit_code_and_one_line(main, code, stderr, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_main(main, "args")
    assert stopped.value.code == code
    assert capsys.readouterr().err == stderr


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)


def test_a_finished_multi_process_run_ends_without_finalization():
    # os._exit: what the interpreter would do at exit (atexit handlers here) is skipped, output flushed.
    script = (
        "import atexit, sys; from launch import entry\n"
        "atexit.register(lambda: print('finalized'))\n"
        "def main():\n"
        "    print('trained', end='')\n"
        "    entry.end_without_finalization()\n"
        "    raise entry.RunError('rank 1: lost')\n"
        "entry.run_main(main)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (1, "trained", "error: rank 1: lost\n")


def test_launch_exits_nowhere_but_in_its_entry_point():
    for path in (ROOT / "launch").glob("*.py"):
        if path.name == "entry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called = f"{getattr(node.func.value, 'id', '?')}.{node.func.attr}"
                assert called not in ("sys.exit", "os._exit"), f"{path.name}:{node.lineno} calls {called}"
