"""Calls ``distributed.rank_zero_first`` in each process of a torchrun job with a load that raises
ERROR("no space left") on FAILING_RANK (-1: on none), and prints what it loaded.

torchrun --standalone --nproc_per_node 2 tests/launch/rank_zero_first_worker.py FAILING_RANK ERROR
"""

import sys

import torch.distributed as dist

from launch import distributed
from launch.entry import run_main


def main():
    failing_rank, error = int(sys.argv[1]), {"RuntimeError": RuntimeError, "OSError": OSError}[sys.argv[2]]
    dist.init_process_group("gloo")

    def load():
        if dist.get_rank() == failing_rank:
            raise error("no space left")
        return dist.get_rank()

    print(f"rank {dist.get_rank()} loaded {distributed.rank_zero_first(load, '--data-path X')}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
