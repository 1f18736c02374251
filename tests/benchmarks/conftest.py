import subprocess
import sys

from tests.conftest import ROOT


def run_quick(script, output, *args, timeout=1200):
    """Runs ``benchmarks/<script> --quick --output <output> <args>`` from the repository root; returns
    its standard output, or fails with both streams."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--output", str(output), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
