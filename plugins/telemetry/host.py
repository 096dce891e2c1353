"""Host samples (psutil): CPU, memory, load, and disk and network I/O as rates between samples."""

from __future__ import annotations

import os
import threading
import time

import psutil

MIB = 2.0**20


class HostSampler:
    """``sample()`` is a telemetry source's ``func``: ``{"node": {metric: value}}``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, float]] | None = None
        psutil.cpu_percent(interval=None)  # the first call only starts psutil's count

    def sample(self) -> dict[str, dict[str, float]]:
        with self._lock:
            now = time.monotonic()
            memory = psutil.virtual_memory()
            values = {
                "cpu_pct": psutil.cpu_percent(interval=None),
                "memory_used_pct": 100.0 * (memory.total - memory.available) / memory.total,
                "load1": os.getloadavg()[0],
            }
            counters: dict[str, float] = {}
            disk = psutil.disk_io_counters()
            if disk is not None:
                counters |= {"disk_read_mib_s": disk.read_bytes, "disk_write_mib_s": disk.write_bytes}
            net = psutil.net_io_counters()
            counters |= {"net_rx_mib_s": net.bytes_recv, "net_tx_mib_s": net.bytes_sent}
            if self._last is not None and now > self._last[0]:
                then, before = self._last
                for name, value in counters.items():
                    if name in before and value >= before[name]:
                        values[name] = (value - before[name]) / MIB / (now - then)
            self._last = (now, {k: float(v) for k, v in counters.items()})
            return {"node": values}
