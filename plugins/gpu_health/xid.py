"""XID events: the kernel log's formats, its reader and de-duplication across sources.

NVML delivers XIDs through an event set; the driver also logs each one to the
kernel ring buffer. NVML misses some (certain drivers; NVML never reports XID
79, 119 or 120, and a GPU that fell off the bus has no NVML handle left), so
both are read and the same XID on the same GPU within a few seconds is
reported once. The kernel-log forms (examples in ``tests/data/kmsg/``):

- ``NVRM: Xid (PCI:0000:3b:00): 79, pid=…, GPU has fallen off the bus.``, and
  ``NVRM: Xid (0000:03:00): 14, …`` (no ``PCI:``; older drivers);
- ``NVRM: GPU 0000:29:00.0: GPU has fallen off the bus.`` (and the older
  ``NVRM: GPU at 0000:29:00.0 has fallen off the bus.``): XID 79 for that GPU.
  The driver logs it beside the XID 79 line, after ``NVRM: GPU at
  PCI:0000:29:00: GPU-<uuid>`` and ``NVRM: GPU Board Serial Number: …``;
- ``nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 45 …``:
  an NVSwitch error, followed by ``…, Severity 0 Engine instance …`` and
  ``…, Data {…}`` lines of the same SXid (not reported again).
"""

from __future__ import annotations

import errno
import os
import re
import select
import threading
import time
from typing import NamedTuple

from vetd.agent.api import SourceUnavailable
from vetd.plugins.gpu_health.model import DriverEvent
from vetd.plugins.gpu_health.sources import OnEvent

_PCI = r"[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?"
XID_LINE = re.compile(rf"NVRM: Xid \((?:PCI:)?({_PCI})\): (\d+),?\s*(.*)")
FALLEN_OFF_LINE = re.compile(rf"NVRM: GPU (?:at )?(?:PCI:)?({_PCI}):? .*fallen off the bus", re.IGNORECASE)
SXID_LINE = re.compile(rf"(?:nvidia-)?(nvswitch\d+): SXid \((?:PCI:)?({_PCI})\): (\d+),?\s*(.*)")
#: The second and third lines of one SXid report: not a new event.
SXID_CONTINUATION = re.compile(r"^(?:Data \{|Severity \d)")
#: ``NVRM: GPU at PCI:0000:29:00: GPU-<uuid>``: which GPU the lines that follow are about.
GPU_HEADER_LINE = re.compile(rf"NVRM: GPU at (?:PCI:)?({_PCI}): (GPU-[0-9a-fA-F-]+)")
SERIAL_LINE = re.compile(r"NVRM: GPU Board Serial Number: (\S+)")
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


class KernelLine(NamedTuple):
    """An event in one kernel-log line and the form it came in."""

    event: DriverEvent
    #: ``xid``, ``fallen_off_bus`` (an XID 79 in other words) or ``sxid``.
    form: str


def parse_line(line: str) -> KernelLine | None:
    """The XID, fallen-off-the-bus or SXid event a kernel-log line reports, or None."""
    if (xid := parse_xid(line)) is not None:
        return KernelLine(DriverEvent(xid[0], "xid", xid[1], xid[2]), "xid")
    if (fallen := FALLEN_OFF_LINE.search(line)) is not None:
        return KernelLine(DriverEvent(normalize_pci(fallen.group(1)), "xid", 79, "GPU has fallen off the bus"),
                          "fallen_off_bus")
    sxid = SXID_LINE.search(line)
    if sxid is None or SXID_CONTINUATION.match(sxid.group(4)):
        return None
    return KernelLine(DriverEvent(normalize_pci(sxid.group(2)), "sxid", int(sxid.group(3)), sxid.group(4).strip(),
                                  device=sxid.group(1)), "sxid")


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
    """Read kernel log records until ``stop``; report XID, fallen-off-the-bus and SXid lines.

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
                parsed = parse_line(text)
                if parsed is not None:
                    on_event(parsed.event)
    finally:
        os.close(fd)
