import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The AMCT sample's MNIST network: conv1 1->128 3x3, conv2 128->128 3x3, fc, log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 128, 3)
        self.conv2 = nn.Conv2d(128, 128, 3)
        self.fc = nn.Linear(128 * 12 * 12, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


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


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()
