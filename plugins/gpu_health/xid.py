"""XID events: the kernel log reader and de-duplication across sources.

NVML delivers XIDs through an event set; the driver also logs each one to the
kernel ring buffer (``NVRM: Xid (PCI:0000:3b:00): 79, pid=…, GPU has fallen off
the bus.``). NVML misses some (certain drivers; a GPU that fell off the bus has
no NVML handle left), so both are read and the same XID on the same GPU within
a few seconds is reported once.
"""

from __future__ import annotations

import errno
import os
import re
import select
import threading
import time

from vetd.agent.api import SourceUnavailable
from vetd.plugins.gpu_health.model import DriverEvent
from vetd.plugins.gpu_health.sources import OnEvent

XID_LINE = re.compile(r"NVRM: Xid \(PCI:([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.\d)?)\): (\d+),\s*(.*)")
#: A ``/dev/kmsg`` record: ``prio,seq,usec,flags[,…];message``.
KMSG_RECORD = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;(.*)$")


def normalize_pci(bus_id: str) -> str:
    """``0000:3b:00``, ``00000000:3B:00.0`` → ``0000:3b:00``: comparable across sources."""
    parts = bus_id.lower().split(":")
    if len(parts) < 3:
        return bus_id.lower()
    domain, bus, device = parts[-3], parts[-2], parts[-1].split(".")[0]
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}"


def parse_xid(line: str) -> tuple[str, int, str] | None:
    """``(pci, xid, detail)`` from a kernel log line, or None."""
    match = XID_LINE.search(line)
    if match is None:
        return None
    return normalize_pci(match.group(1)), int(match.group(2)), match.group(3).strip()


class Deduper:
    """Drops an event (the same XID, say) already reported for the same GPU within ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._seen: dict[tuple[str, str, int], float] = {}
        self._lock = threading.Lock()
        self.duplicates = 0

    def first(self, event: DriverEvent, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        key = (normalize_pci(event.pci), event.kind, event.value)
        with self._lock:
            last = self._seen.get(key)
            self._seen[key] = now
            if last is not None and now - last < self.window:
                self.duplicates += 1
                return False
            return True


def follow_kmsg(
    on_event: OnEvent,
    stop: threading.Event,
    path: str = "/dev/kmsg",
    lookback_s: float = 600.0,
) -> None:
    """Read kernel log records until ``stop``; report ``NVRM: Xid`` lines.

    Records older than ``lookback_s`` (by the kernel's monotonic timestamp) are
    skipped, so a restart reports a recent XID but not last week's. Works on
    ``/dev/kmsg`` (one record per read) and on a pipe of such records.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise SourceUnavailable(f"cannot read {path}: {exc.strerror}") from exc
    oldest_us = (time.clock_gettime(time.CLOCK_MONOTONIC) - lookback_s) * 1e6
    pending = b""
    try:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten while we were away
                    continue
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            if not chunk:  # a pipe whose writer closed
                stop.wait(0.2)
                continue
            pending += chunk
            *records, pending = pending.split(b"\n")
            for raw in records:
                text = raw.decode("utf-8", errors="replace")
                match = KMSG_RECORD.match(text)
                if match is not None:
                    if float(match.group(3)) < oldest_us:
                        continue
                    text = match.group(4)
                xid = parse_xid(text)
                if xid is not None:
                    pci, number, detail = xid
                    on_event(DriverEvent(pci, "xid", number, detail))
    finally:
        os.close(fd)
