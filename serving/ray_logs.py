"""Our loggers into the log file Ray Serve keeps for the process they run in (replica or proxy)."""

from __future__ import annotations

import logging
import logging.handlers

# Our modules' loggers: "shopguide.*" (api, explore, admission) and the packages' __name__ loggers.
APP_LOGGERS = ("shopguide", "serving", "training", "index", "encoders")


def log_to_serve_file(names: tuple[str, ...] = APP_LOGGERS) -> None:
    """Send these loggers' records to the file Ray Serve set up for this process (LOGS/serve/...).

    Ray sets up handlers for its own "ray.serve" logger only; without this, a 500's error id or a
    failed model refresh logged in a replica would be written nowhere anyone can find it."""
    # Ray buffers its own records in a MemoryHandler (in throughput mode until an ERROR or a full
    # buffer); ours are rare and must be on disk at once, so they go straight to its file handler.
    handlers = [
        h.target if isinstance(h, logging.handlers.MemoryHandler) and h.target is not None else h
        for h in logging.getLogger("ray.serve").handlers
    ]
    if not handlers:  # Ray has not set up its logging here (yet): stderr is better than nowhere
        return
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = list(handlers)
        logger.propagate = False  # the same record must not also reach Ray's stderr capture
        logger.setLevel(logging.INFO)
