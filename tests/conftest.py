import logging
import socket
import sys

import pytest
import torch

from launch.mnist import Net


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def lowrank_log():
    """Messages of the ``lowrank`` logger (it does not propagate, so caplog does not see them)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("lowrank")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def free_port():
    """A TCP port free right now on localhost, for accelerate launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args):
    """The command line of a 2-process torchrun job; ``--standalone`` rendezvous on localhost:0, so
    torchrun picks its own free port and concurrent jobs cannot race for one."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()
