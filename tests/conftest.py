import logging
import socket

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


def free_ports(count):
    """TCP ports free right now on localhost, distinct (all held open until all are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port():
    """A TCP port free right now on localhost, for a launcher's rendezvous."""
    return free_ports(1)[0]


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()
