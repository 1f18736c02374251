"""The errors that stop a run, and the recipes' one entry point that turns them into the process's exit:
``launch`` itself raises, so that its functions can be called from a notebook or another trainer."""

import logging
import os
import sys
from collections.abc import Callable

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1; --resume continues from the latest checkpoint


class RunError(Exception):
    """A run cannot go on; the message says why and what to do, in one line."""


class Preempted(SystemExit):
    """A preemption signal stopped the run (its checkpoint saved, when it came during training). A
    SystemExit, so that no ``except Exception`` on the way mistakes it for a failure; uncaught, the
    process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


# Set by the runner's end_run once a multi-process run has finished its work (see run_main).
_end_without_finalization = False


def end_without_finalization() -> None:
    """Makes ``run_main`` end the process with ``os._exit``: in a multi-process run, a gloo worker thread
    still releasing a collective's tensors when the interpreter finalizes aborts the process
    ("terminate called without an active exception", exit -6) now and then, after all the work is
    done, and a scheduler would count the job as failed (pytorch/pytorch#190489)."""
    global _end_without_finalization
    _end_without_finalization = True


def run_main(main: Callable, *args) -> None:
    """``main(*args)``, then the process's exit: 0, 1 with ``error: <message>`` on stderr for a
    RunError, PREEMPTED_EXIT_CODE when preempted. Any other exception propagates with its traceback."""
    message = None
    try:
        main(*args)
        code = 0
    except RunError as error:
        code, message = 1, f"error: {error}"
    except Preempted as stop:
        code = stop.code
    if message:
        print(message, file=sys.stderr)
    if _end_without_finalization:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
