"""The ``lowrank`` command.

lowrank inspect decompose_info.json    # per layer: method, ranks, parameters and MACs before/after
                                       # (and the measured times, for the latency rule)
"""

import argparse
import sys

from .info import DecomposeInfoError
from .report import inspect_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description="Low-rank decomposition of PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the layers recorded in a decomposition info file")
    inspect.add_argument("info_file", help="a decomposition info file written by auto_decomposition")
    args = parser.parse_args(argv)
    try:
        print(inspect_table(args.info_file))
    except (OSError, DecomposeInfoError) as error:
        print(f"lowrank: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
