"""Preemption: SIGTERM or SIGUSR1 (a scheduler's time limit or preemption) makes every rank save a
checkpoint at the next step and end with exit code 75, which a scheduler can requeue; ``--resume``
continues from it."""

import contextlib
import signal

import torch

from .distributed import log
from .entry import PREEMPTED_EXIT_CODE, Preempted


class Preemption:
    """SIGTERM/SIGUSR1, from ``install`` on (``create_accelerator``). While ``recording`` (the training
    loop) a signal is remembered, and ``requested`` makes every rank agree, so that they all save a
    checkpoint together at the next step; at any other time (setup, evaluation, saving) it raises
    ``Preempted`` at once, the latest checkpoint standing."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self.recording = False

    def install(self):
        self.received, self.recording = None, False
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if not self.recording:
            log(f"[Preempted] {self.received} outside the training steps: exiting with {PREEMPTED_EXIT_CODE}")
            raise Preempted

    @contextlib.contextmanager
    def recorded(self):
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def requested(self, accelerator) -> bool:
        signalled = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(signalled, reduction="sum").item() > 0)


preemption = Preemption()


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers: they ignore the preemption signals, which a launcher or
    Slurm also sends to them, so that they keep serving batches while the training process saves its
    checkpoint (by default a worker dies of them, and the training process fails before it can save).
    The training process stops them when it exits."""
    for signum in Preemption.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
