"""Where snapshots come from, and the deadline every source is read under.

Drivers do hang (after XID 45/79 an NVML call can block for minutes). Every
snapshot is therefore taken on one dedicated worker thread with a deadline:
past it the caller gets :class:`DriverUnresponsive` at once, and later calls
fail fast while that thread is still stuck, so no thread pile-up, and the
agent, its other checks and its watchdog carry on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Protocol

from vetd.agent.api import Emit, SourceUnavailable
from vetd.plugins.gpu_health.model import DriverEvent, NodeSnapshot

NVIDIA_VENDOR = "0x10de"
#: PCI classes of GPUs: VGA (0x0300xx) and 3D controller (0x0302xx); NVSwitch is 0x0680.
GPU_CLASSES = ("0x0300", "0x0302")
#: Drivers that hand a GPU to a virtual machine: the host's NVIDIA driver never sees it.
PASSTHROUGH_DRIVERS = frozenset({"vfio-pci"})


#: Where a source's watcher reports what the driver says, as it says it.
OnEvent = Callable[[DriverEvent], None]


class DriverUnresponsive(Exception):
    """The driver did not answer within the deadline."""


class Source(Protocol):
    name: str

    def snapshot(self) -> NodeSnapshot: ...

    def expected_gpus(self) -> int | None: ...

    def watch(self, on_event: OnEvent, stop: threading.Event) -> None:
        """Report XIDs and other driver events until ``stop``; raise ``SourceUnavailable`` if there are none."""


def nvidia_gpus_in_sysfs(root: Path | str = "/sys/bus/pci/devices") -> int:
    """NVIDIA GPU functions the kernel enumerated for the host: bound to a driver or not yet
    bound, but not those bound to ``vfio-pci`` (passed to a VM; counting them failed the node)."""
    count = 0
    for device in Path(root).glob("*"):
        try:
            vendor = (device / "vendor").read_text().strip()
            klass = (device / "class").read_text().strip()
        except OSError:
            continue
        if vendor == NVIDIA_VENDOR and klass.startswith(GPU_CLASSES) and _driver(device) not in PASSTHROUGH_DRIVERS:
            count += 1
    return count


def _driver(device: Path) -> str:
    """The name of the driver bound to a PCI device (its ``driver`` link), "" when none is."""
    try:
        return (device / "driver").resolve(strict=True).name
    except OSError:
        return ""


class Guard:
    """Runs ``take()`` on one daemon worker thread with a deadline.

    Callers that arrive while a query is in flight share it instead of queueing
    a second one; the deadline runs from when that query started. A query that
    never returns leaves the worker stuck, and every later call fails at once
    with :class:`DriverUnresponsive` until it does return.
    """

    def __init__(self, take: Callable[[], NodeSnapshot], timeout: float, name: str = "vetd.gpu.driver") -> None:
        self.take = take
        self.timeout = timeout
        self.name = name
        self._requests: queue.SimpleQueue[Future[NodeSnapshot]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight: Future[NodeSnapshot] | None = None
        self._started = 0.0
        self._thread: threading.Thread | None = None

    def _worker(self) -> None:
        while True:
            future = self._requests.get()
            try:
                future.set_result(self.take())
            except BaseException as exc:  # noqa: BLE001 - handed to the callers
                future.set_exception(exc)

    def snapshot(self) -> NodeSnapshot:
        with self._lock:
            future = self._inflight
            if future is None or future.done():
                if self._thread is None:
                    self._thread = threading.Thread(target=self._worker, name=self.name, daemon=True)
                    self._thread.start()
                future = self._inflight = Future()
                self._started = time.monotonic()
                self._requests.put(future)
            started = self._started
        remaining = started + self.timeout - time.monotonic()
        try:
            return future.result(timeout=max(0.0, remaining))
        except FutureTimeout:
            waited = time.monotonic() - started
            raise DriverUnresponsive(f"driver query has not returned after {waited:.1f}s "
                                     f"(deadline {self.timeout:g}s)") from None


__all__ = ["DriverUnresponsive", "Emit", "Guard", "OnEvent", "Source", "SourceUnavailable", "nvidia_gpus_in_sysfs"]
