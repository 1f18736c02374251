"""Runs the barrier in each process of a torchrun job; each rank writes RESULTS/<rank>.json.

torchrun --nproc_per_node 2 tests/launch/barrier_worker.py OUT_DIR PRETRAINED RESULTS [--timeout S] [--hang S]
    [--change-weights-file | --change-loaded-weights] [--per-rank-folder | --per-rank-weights] [--offline]
    [--slow-probe]

The tampering flags make rank 1 meet what the barrier must refuse: the weights file changed after rank 0
wrote it (another job on the same paths), or weights that differ from rank 0's once loaded (another
copy). ``--per-rank-folder`` gives each rank its own artifact folder, OUT_DIR/rank<N>, as node-local
folders would, ``--per-rank-weights`` its own weights folder only; ``--offline`` loads the artifacts
there as an offline run does instead.
``--slow-probe`` has rank 1 miss rank 0's probe in a folder they share, as on a slow filesystem.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from launch import barrier
from launch.barrier import Artifacts, decompose_once, parameters_digest, run_token
from launch.distributed import before_process_group
from launch.model import prepare_model
from lowrank.io import load_state_dict


def small_model():
    return nn.Sequential(nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("pretrained")
    parser.add_argument("results")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--hang", type=float, default=0, help="rank 0 sleeps this long before loading the weights")
    tampering = parser.add_mutually_exclusive_group()
    tampering.add_argument("--change-weights-file", action="store_true")
    tampering.add_argument("--change-loaded-weights", action="store_true")
    folders = parser.add_mutually_exclusive_group()
    folders.add_argument("--per-rank-folder", action="store_true")
    folders.add_argument("--per-rank-weights", action="store_true")
    parser.add_argument("--offline", action="store_true")
    parser.add_argument("--slow-probe", action="store_true")
    args = parser.parse_args()
    before_process_group()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 1:
        tamper(args)
        if args.slow_probe:
            barrier._sees = lambda probe, token: False

    def load_pretrained(model):
        time.sleep(args.hang)
        model.load_state_dict(load_state_dict(args.pretrained))

    out_dir = Path(args.out_dir) / f"rank{rank}" if args.per_rank_folder else Path(args.out_dir)
    weights_dir = Path(args.out_dir) / f"rank{rank}" if args.per_rank_weights else out_dir
    artifacts = Artifacts(out_dir / "decompose_info.json", weights_dir / "decomposed_weights.pth")
    torch.manual_seed(rank)  # different random init on each rank: the barrier must make them identical
    model = small_model()
    token = run_token()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    try:
        if args.offline:
            model, changes, _, reused = prepare_model(
                model, "offline", info_path=artifacts.info_path, weights_path=artifacts.weights_path
            )
        else:
            policy = {"method": "spatial", "ratio": 0.3}
            model, changes, reused = decompose_once(
                model, artifacts, load_pretrained, args.pretrained, policy, token, args.timeout
            )
    except Exception as error:
        failure = {"rank": rank, "error": f"{type(error).__name__}: {error}"}
        (results / f"{rank}.json").write_text(json.dumps(failure))
        sys.exit(1)
    dist.destroy_process_group()
    result = {
        "rank": rank,
        "changes": changes,
        "reused": reused,
        "digest": parameters_digest(model),
        "pid": os.getpid(),
        # gloo's threads left running race the interpreter's exit (see launch/__init__.py)
        "gloo_threads_after_destroy": gloo_threads(),
    }
    (results / f"{rank}.json").write_text(json.dumps(result))


def tamper(args):
    """On this rank, the weights file changes once rank 0 has said it is done, or the weights loaded
    from it change before the ranks compare theirs."""
    wait_for_marker, load_decomposed = barrier._wait_for_marker, barrier.load_decomposed

    def marker_then_changed_file(artifacts, *rest):
        marker = wait_for_marker(artifacts, *rest)
        with open(artifacts.weights_path, "ab") as file:
            file.write(b"appended by another job")
        return marker

    def loaded_then_changed(*arguments):
        model, changes = load_decomposed(*arguments)
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        return model, changes

    if args.change_weights_file:
        barrier._wait_for_marker = marker_then_changed_file
    if args.change_loaded_weights:
        barrier.load_decomposed = loaded_then_changed


def gloo_threads() -> int:
    return sum(
        Path(f"/proc/self/task/{task}/comm").read_text().startswith("pt_gloo") for task in os.listdir("/proc/self/task")
    )


if __name__ == "__main__":
    main()
