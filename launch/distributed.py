"""What the ranks of a job share: the global rank, rank 0's log lines, values and buffers.

Ranks come from torch.distributed: under some launchers (``accelerate launch --use_deepspeed`` on the
CPU) Accelerate's ``process_index`` is 0 on every rank.
"""

import importlib
import os
import socket
import sys

import torch.distributed as dist
from tqdm import tqdm

from .entry import RunError


def before_process_group() -> None:
    """Call before creating a process group (``create_accelerator`` does). Loads torch._dynamo, which
    PyTorch imports at the first operation on the meta device or under its FLOP counter (lowrank does
    both): loaded once a group exists, it keeps references to the default group (torch 2.14), so that
    destroy_process_group cannot stop gloo's threads, and the interpreter's finalization now and then
    aborts the process after the work is done (pytorch/pytorch#190489)."""
    importlib.import_module("torch._dynamo")


def global_rank() -> int:
    """The rank from torch.distributed (Accelerate's process_index is 0 on every rank under some launchers)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def node_name() -> str:
    """This node's name as Slurm calls it, else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def log(line: str) -> None:
    if global_rank() == 0:
        tqdm.write(line, file=sys.stdout)  # prints above the progress bar when there is one


def from_rank_zero(value):
    """``value`` as global rank 0 has it, on every rank (as it is, on a single process)."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def rank_zero_first(load, what: str):
    """``load()`` on global rank 0, then on the other ranks (rank 0 prepares what they read: a dataset
    it unpacks or downloads). An error on any rank ends every rank with the first failing rank's
    message, after ``what`` (a RuntimeError's message says what is wrong, as the loaders raise it;
    other errors add their type): with ``main_process_first`` the others would fail in their barrier
    with gloo's traceback, or wait in the next collective until its timeout."""
    error, loaded = _attempt(load) if global_rank() == 0 else (None, None)
    error = from_rank_zero(error)
    if error:  # rank 0's: the others did not try
        raise RunError(f"{what}: {error}")
    if global_rank() != 0:
        error, loaded = _attempt(load)
    _stop_on_any_error(error, what)
    return loaded


def on_every_rank(load):
    """``load()`` on every rank at once; an error on any rank ends every rank with the first failing
    rank's message, after that rank and its node (a file missing on one node), instead of leaving the
    others waiting in their next collective until its timeout."""
    error, loaded = _attempt(load)
    _stop_on_any_error(error)
    return loaded


def _attempt(load):
    try:
        return None, load()
    except Exception as error:  # any: a rank that left alone would keep the others waiting
        return str(error) if isinstance(error, RuntimeError) else f"{type(error).__name__}: {error}", None


def _stop_on_any_error(error: str | None, what: str | None = None) -> None:
    errors = [(node_name(), error)]
    if dist.is_available() and dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, (node_name(), error))
    for rank, (node, error) in enumerate(errors):
        if error:  # a path missing on another node, or not shared with it
            raise RunError(f"{what + ': ' if what else ''}rank {rank} on {node}: {error}")


def share_rank_zero_buffers(model) -> None:
    """Gives every rank global rank 0's buffers (BatchNorm's running statistics), as DDP does at each
    forward and DeepSpeed never: each rank would evaluate with its own, and a checkpoint (rank 0's)
    would resume into other statistics than the uninterrupted run's."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
