"""What a dilo process sets up before it trains: logging, stop signals, its thread count."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from dilo.errors import DiloError


def setup_logging() -> None:
    level = os.environ.get("DILO_LOG", "WARNING").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise DiloError(f"DILO_LOG={os.environ['DILO_LOG']!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def install_stop_handlers() -> threading.Event:
    """First SIGINT/SIGTERM: stop after the current round. Second SIGINT: abort now."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return stop


def apply_threads() -> None:
    """DILO_THREADS (set by `dilo run` to share the cores between its workers): torch's intra-op threads."""
    value = os.environ.get("DILO_THREADS")
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise DiloError(f"DILO_THREADS={value!r}: give a whole number of threads, at least 1")
    import torch

    torch.set_num_threads(int(value))
