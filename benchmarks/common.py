"""What the benchmark scripts share: the machine's description, tables, JSON, plots, and launching
the MNIST recipes on 2 CPU processes. Imported by the scripts of this folder (run as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``); not a package."""

import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

import lowrank
from lowrank.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RECIPES = ROOT / "recipes"
CPU_2PROC = RECIPES / "configs" / "cpu_2proc.yaml"

# Environment variables that change how the BLAS/LAPACK threads behave, recorded with the machine.
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )


def machine_info(**versions) -> dict:
    """The machine, the thread settings, the load and the versions (``versions`` adds others)."""
    info = {
        "cpu": cpu_name(),
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "openmp_environment": {name: os.environ[name] for name in OPENMP_VARIABLES if name in os.environ},
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lowrank": lowrank.__version__,
        **versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict) -> str:
    environment = "".join(f", {name}={value}" for name, value in info["openmp_environment"].items())
    end = info.get("load_average_at_end")
    load = f"load average {info['load_average_at_start'][0]:.2f} at start" + (f", {end[0]:.2f} at end" if end else "")
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"Machine: {info['cpu']}, {info['nproc']} CPUs{gpu}, torch {info['torch']} ({info['torch_threads']} threads"
        f"{environment}), {info['date']}; {load}"
    )


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def table(header, rows) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def save_json(results, path) -> None:
    """Writes ``results`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    atomic_write(path, lambda file: json.dump(results, file, indent=2, default=str), binary=False)


def publish(results, output, report, plot) -> None:
    """A benchmark's end: prints ``report(results)``, saves the JSON at ``output`` and draws
    ``plot(results, path)`` into the PNG next to it."""
    print()
    print(report(results))
    save_json(results, output)
    print(f"\nSaved {output}")
    figure = Path(output).with_suffix(".png")
    plot(results, figure)
    print(f"Saved {figure}")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(figure)


def add_data_path_argument(parser) -> None:
    parser.add_argument(
        "--data-path", default="../shared/data", help="folder holding MNIST/raw/ (default: ../shared/data)"
    )


def add_output_argument(parser, stem: str) -> None:
    """``--output``: the JSON file, with the PNGs next to it; the default depends on ``--quick``."""
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"JSON file to write; its PNGs go next to it (default: benchmarks/results/{stem}.json, "
        f"{stem}_quick.json with --quick)",
    )


def add_replot_argument(parser, drawn: str) -> None:
    """``--replot JSON``: redraw ``drawn`` from a saved JSON file, next to it, without measuring."""
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help=f"only redraw the {drawn} of a saved JSON file, next to it, without measuring (default: None)",
    )


def output_path(args, stem: str) -> Path:
    return args.output or RESULTS_DIR / (f"{stem}_quick.json" if args.quick else f"{stem}.json")


def free_port() -> int:
    """A TCP port free right now on localhost, for accelerate launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_recipe(recipe: str, *args, stop_at_first_step: bool = False) -> dict:
    """Runs ``recipes/<recipe>`` on 2 CPU processes (``accelerate launch`` with
    ``recipes/configs/cpu_2proc.yaml``); exits with the run's output when it fails. Returns the
    seconds from process start to the first training step that the runner logs, the wall time and
    the log. ``stop_at_first_step`` interrupts the job once that line is out: the launcher (torch's
    elastic agent) passes the SIGINT on to its workers and waits for them."""
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--main_process_port"]
    command = [sys.executable, *launcher, str(free_port()), str(RECIPES / recipe), *map(str, args)]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},  # lines arrive as they are logged
        cwd=ROOT,
    )
    log, first_step = [], None
    for line in process.stdout:
        log.append(line)
        match = re.search(r"\[Train\] first step at ([\d.]+) s", line)
        if match:
            first_step = float(match.group(1))
            if stop_at_first_step:
                process.send_signal(signal.SIGINT)
    returncode = process.wait()
    if returncode != 0 and not (stop_at_first_step and first_step is not None):
        sys.exit(f"{recipe} failed ({returncode}):\n{''.join(log)}")
    return {"first_step_s": first_step, "wall_s": time.perf_counter() - started, "log": "".join(log)}
