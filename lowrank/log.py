"""The ``lowrank`` logger: lines prefixed ``[lowrank]`` as in the AMCT sample, on stderr, INFO by default.

The level comes from ``set_logger_level`` or the ``LOWRANK_LOG_LEVEL`` environment variable. The
logger does not propagate, so an application that configures the root logger does not print our lines
twice.
"""

import logging
import os
import sys

LEVEL_ENV = "LOWRANK_LOG_LEVEL"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
ALIASES = {"warn": "warning", "fatal": "critical"}  # as the logging module accepts them

logger = logging.getLogger("lowrank")


class _Formatter(logging.Formatter):
    def format(self, record):
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"[lowrank] {level}{record.getMessage()}"


def _level(level) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        name = level.strip().lower()
        name = ALIASES.get(name, name)
        if name in LEVELS:
            return LEVELS[name]
    raise ValueError(f"unknown log level {level!r}; valid levels: {', '.join(LEVELS)}")


def set_logger_level(level="info") -> None:
    """Sets the level of the ``lowrank`` logger: ``"debug"``, ``"info"``, ``"warning"``, ``"error"``,
    ``"critical"`` or a ``logging`` constant."""
    logger.setLevel(_level(level))


def _configure():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.propagate = False
    # A bad value must not make the library unimportable (an empty one is common in job scripts).
    try:
        set_logger_level(os.environ.get(LEVEL_ENV, "").strip() or "info")
    except ValueError as error:
        set_logger_level("info")
        logger.warning(f"{LEVEL_ENV}: {error}; logging at info")


_configure()
