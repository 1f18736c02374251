"""Compares the results of runs (the ``results.json`` each recipe writes in its --output-dir).

    python recipes/compare_runs.py runs/baseline runs/online runs/offline

The first run is the reference for the size and FLOPs ratios.
"""

import argparse
import json
import sys
from pathlib import Path

# The entries of results.json that the table shows.
KEYS = ("mode", "accuracy", "loss", "params", "flops")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of the runs; the first is the reference")
    return parser


def main(args):
    rows = []
    for run in args.runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            sys.exit(f"error: {path} does not exist (did the run finish?)")
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
            sys.exit(f"error: {path} cannot be read: {error}")
        # Checked for every run before the table's first line: a bad one would cut the table short.
        missing = [key for key in KEYS if not isinstance(results, dict) or key not in results]
        if missing:
            sys.exit(f"error: {path} is not the results of a run: it has no {', '.join(missing)}")
        rows.append((run, results))
    reference = rows[0][1]
    # FLOPs grow with the input (ResNet's --image-size): runs counted on other inputs are not comparable.
    # Results written before the shape was recorded have none, and are compared as they are.
    shapes = {run: results["flops_input_shape"] for run, results in rows if "flops_input_shape" in results}
    if len({str(shape) for shape in shapes.values()}) > 1:
        counted = ", ".join(f"{run} on {'x'.join(map(str, shape))}" for run, shape in shapes.items())
        sys.exit(
            f"error: the runs' FLOPs were counted on inputs of different sizes ({counted}): compare runs of one size"
        )
    header = ("run", "mode", "accuracy", "test loss", "params", "FLOPs", "smaller", "cheaper")
    print("{:<24} {:<9} {:>9} {:>10} {:>11} {:>13} {:>8} {:>8}".format(*header))
    for run, r in rows:
        # A diverged run's NaN or infinite loss is written as null.
        loss = "not finite" if r["loss"] is None else f"{r['loss']:.6f}"
        print(
            f"{run:<24} {r['mode']:<9} {100 * r['accuracy']:>8.2f}% {loss:>10} {r['params']:>11,} "
            f"{r['flops']:>13,} {reference['params'] / r['params']:>7.2f}x {reference['flops'] / r['flops']:>7.2f}x"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
