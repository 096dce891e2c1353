"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``), no libsystemd.

``READY=1`` once the agent runs, ``STOPPING=1`` on shutdown, ``WATCHDOG=1`` from
the event loop itself at half of ``WATCHDOG_USEC``: a hung NVML call in a worker
thread does not stop the pings, a stuck event loop does.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET``; does nothing outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, state: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block the event loop on a receiver that is not reading (its queue full):
            # a ping that cannot go now is dropped, the next one follows.
            sock.setblocking(False)
            try:
                sock.sendto(state.encode(), self.address)
            except OSError:
                return False
        return True
