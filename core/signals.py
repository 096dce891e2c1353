"""The daemons' signals, the same on both sides: SIGTERM and SIGINT stop, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def handle(loop: asyncio.AbstractEventLoop, stop: Callable[[], object], reload: Callable[[], object]) -> None:
    """Stop on SIGTERM/SIGINT, reload on SIGHUP, from the event loop (never inside a handler's frame)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)


def release(loop: asyncio.AbstractEventLoop) -> None:
    """Take the handlers off; a repeated SIGTERM while already stopping must not kill the process mid-exit."""
    for signum in HANDLED:
        loop.remove_signal_handler(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
