"""Every NVML call vetd makes, with what the driver answered and how long it took.

:class:`Tracer` stands between pynvml and the library below it (the real
``libnvidia-ml.so.1`` or :class:`~vetd.plugins.gpu_health.nvmlsim.SimulatedNvml`),
so pynvml and :class:`~vetd.plugins.gpu_health.nvml.NvmlSource` run unchanged while
each C call is timed and its return code kept. :func:`survey` drives the NVML
source through snapshots and its event watcher under a tracer and returns a
:class:`Survey`: the same record from a GPU node and from the simulation of
that node's capture shows, call by call, where the simulation answers
differently from the driver (``bench/nvml_calls.py``, and the tests that
keep a recorded survey from real hardware).
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from vetd.plugins.gpu_health.model import DriverEvent


class CallClass(msgspec.Struct, kw_only=True):
    """One C function with one set of plain arguments (the link, the sensor...)."""

    function: str
    #: The call's integer arguments (handles, buffers and out-parameters left out).
    args: list[int] = []
    calls: int = 0
    #: Return code name (``SUCCESS``, ``ERROR_NOT_SUPPORTED``...) → how often.
    outcomes: dict[str, int] = {}
    wall_us_median: float = 0.0
    wall_us_max: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.function}({', '.join(map(str, self.args))})"


class Events(msgspec.Struct, kw_only=True):
    """The event watcher under the driver: what it registered and how it stopped."""

    #: Per GPU index, the event types the driver says the GPU supports (pynvml's ``nvmlEventType*`` names).
    supported: dict[str, list[str]] = {}
    watched_s: float = 0.0
    #: From ``stop.set()`` to the watcher thread's end.
    stop_s: float | None = None
    received: list[str] = []
    error: str = ""


class Survey(msgspec.Struct, kw_only=True):
    library: str
    driver_version: str | None = None
    nvml_version: str | None = None
    pynvml_version: str = ""
    gpus: int = 0
    gpu_names: list[str] = []
    snapshots: int = 0
    #: The first snapshot probes every NVLink; later ones only those that answered.
    first_snapshot_ms: float = 0.0
    snapshot_ms_median: float = 0.0
    snapshot_ms_max: float = 0.0
    calls_per_snapshot: int = 0
    calls: list[CallClass] = []
    events: Events | None = None
    #: What the code review could not settle without a driver (MIG mode, GPM support...), as read.
    probes: dict[str, str] = {}

    def by_key(self) -> dict[str, CallClass]:
        return {call.key: call for call in self.calls}


def _plain(arg: Any) -> int | None:
    """An argument's integer value, or None for handles, buffers and out-parameters."""
    if isinstance(arg, bool):
        return int(arg)
    if isinstance(arg, int):
        return arg
    if isinstance(arg, ctypes.c_uint | ctypes.c_int | ctypes.c_ulonglong | ctypes.c_longlong | ctypes.c_ulong):
        return int(arg.value)
    return None


class _Traced:
    """One C function: called through, timed, its return code kept."""

    def __init__(self, tracer: Tracer, name: str, function: Any) -> None:
        self.__dict__.update(_tracer=tracer, _name=name, _function=function)

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        result = self._function(*args)
        wall = time.perf_counter() - start
        code = result if isinstance(result, int) else None
        self._tracer.record(self._name, [v for v in map(_plain, args) if v is not None], code, wall)
        return result

    # pynvml sets restype on some functions (nvmlErrorString): it belongs to the real one.
    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._function, name, value)


class Tracer:
    """Stands where pynvml keeps the library (``pynvml.nvmlLib``) and records every call through it."""

    def __init__(self) -> None:
        import pynvml

        self.pynvml = pynvml
        self._names = {int(getattr(pynvml, name)): name.removeprefix("NVML_")
                       for name in dir(pynvml) if name.startswith("NVML_ERROR_")}
        self._names[int(pynvml.NVML_SUCCESS)] = "SUCCESS"
        self._lock = threading.Lock()
        self._walls: dict[tuple[str, tuple[int, ...]], list[float]] = {}
        self._outcomes: dict[tuple[str, tuple[int, ...]], dict[str, int]] = {}
        self.count = 0
        self._library: Any = None

    def outcome(self, code: int | None) -> str:
        if code is None:
            return "RETURNED"  # a function whose result is not a return code (nvmlErrorString)
        return self._names.get(code, f"CODE_{code}")

    def record(self, function: str, args: list[int], code: int | None, wall: float) -> None:
        key = (function, tuple(args))
        with self._lock:
            self.count += 1
            self._walls.setdefault(key, []).append(wall)
            outcomes = self._outcomes.setdefault(key, {})
            name = self.outcome(code)
            outcomes[name] = outcomes.get(name, 0) + 1

    def __getattr__(self, name: str) -> Any:
        try:
            function = getattr(self._library, name)
        except AttributeError:
            # pynvml turns a missing symbol into FUNCTION_NOT_FOUND: an older driver, or the simulation's gap.
            self.record(name, [], int(self.pynvml.NVML_ERROR_FUNCTION_NOT_FOUND), 0.0)
            raise
        return _Traced(self, name, function)

    def install(self) -> Callable[[], None]:
        """Trace whatever library pynvml has (loading the real one if none is set); returns the undo."""
        n = self.pynvml
        n._LoadNvmlLibrary()
        with n.libLoadLock:
            self._library = n.nvmlLib
            n.nvmlLib = self
            n._nvmlGetFunctionPointer_cache.clear()

        def restore() -> None:
            with n.libLoadLock:
                n.nvmlLib = self._library
                n._nvmlGetFunctionPointer_cache.clear()

        return restore

    def classes(self) -> list[CallClass]:
        with self._lock:
            return [
                CallClass(function=function, args=list(args), calls=len(walls), outcomes=dict(self._outcomes[key]),
                          wall_us_median=round(1e6 * statistics.median(walls), 2),
                          wall_us_max=round(1e6 * max(walls), 2))
                for key, walls in sorted(self._walls.items())
                for function, args in [key]
            ]


def _event_names(n: Any, mask: int) -> list[str]:
    names = sorted(name for name in dir(n) if name.startswith("nvmlEventType") and name not in
                   ("nvmlEventTypeAll", "nvmlEventTypeNone") and isinstance(getattr(n, name), int))
    return [name.removeprefix("nvmlEventType") for name in names if getattr(n, name) and mask & getattr(n, name)
            == getattr(n, name)]


def _watch(source: Any, seconds: float) -> Events:
    """Run the source's event watcher for ``seconds``, then stop it and time the stop."""
    n = source.nvml
    events = Events()
    for index in range(n.nvmlDeviceGetCount()):
        try:
            mask = n.nvmlDeviceGetSupportedEventTypes(n.nvmlDeviceGetHandleByIndex(index))
            events.supported[str(index)] = _event_names(n, int(mask))
        except n.NVMLError as exc:
            events.supported[str(index)] = [f"error: {exc}"]
    received: list[DriverEvent] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            source.watch(received.append, stop)
        except Exception as exc:  # noqa: BLE001 - recorded: the survey says how the watcher failed
            failure.append(exc)

    thread = threading.Thread(target=run, name="vetd.nvmltrace.watch", daemon=True)
    thread.start()
    time.sleep(seconds)
    stopped = time.perf_counter()
    stop.set()
    thread.join(10.0)
    events.watched_s = seconds
    events.stop_s = None if thread.is_alive() else round(time.perf_counter() - stopped, 3)
    events.received = [f"{e.kind} {e.value} {e.pci} {e.detail}".strip() for e in received]
    events.error = f"{type(failure[0]).__name__}: {failure[0]}" if failure else ""
    return events


def _probes(source: Any) -> dict[str, str]:
    """Readings the code review could not settle without a driver, each as the driver answered."""
    n = source.nvml
    probes: dict[str, str] = {}

    def probe(name: str, read: Callable[[], Any]) -> None:
        try:
            probes[name] = str(read())
        except n.NVMLError as exc:
            probes[name] = f"error: {exc}"
        except (AttributeError, TypeError) as exc:  # a pynvml without the function
            probes[name] = f"unavailable: {exc}"

    handle = n.nvmlDeviceGetHandleByIndex(0)
    probe("mig_mode", lambda: n.nvmlDeviceGetMigMode(handle))
    probe("gpm_supported", lambda: n.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
    probe("nvlink_max_links_pynvml", lambda: n.NVML_NVLINK_MAX_LINKS)
    probe("clock_sm_max_mhz", lambda: n.nvmlDeviceGetMaxClockInfo(handle, n.NVML_CLOCK_SM))
    probe("clock_mem_max_mhz", lambda: n.nvmlDeviceGetMaxClockInfo(handle, n.NVML_CLOCK_MEM))
    probe("power_limit_default_w", lambda: n.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000)
    probe("compute_mode", lambda: n.nvmlDeviceGetComputeMode(handle))
    from vetd.plugins.gpu_health.nvml import FIELDS, field_value

    fields = {name: getattr(n, name) for name in FIELDS.values() if hasattr(n, name)}

    def field_values() -> str:
        values = n.nvmlDeviceGetFieldValues(handle, list(fields.values()))
        return "; ".join(f"{name}: {field_value(v) if v.nvmlReturn == n.NVML_SUCCESS else f'error {v.nvmlReturn}'}"
                         for name, v in zip(fields, values, strict=True))

    probe("field_values", field_values)
    return probes


def survey(source_factory: Callable[[], Any], *, snapshots: int = 20, watch_s: float = 2.0,
           library: str = "libnvidia-ml.so.1") -> Survey:
    """Trace ``snapshots`` NVML snapshots and ``watch_s`` seconds of the event watcher.

    ``source_factory`` opens the NVML source (:class:`~vetd.plugins.gpu_health.nvml.NvmlSource`)
    once the tracer is in place, so ``nvmlInit`` is traced too. With the
    simulation, install it before calling this: the tracer wraps whatever
    library pynvml has.
    """
    tracer = Tracer()
    restore = tracer.install()
    try:
        source = source_factory()
        n = source.nvml
        walls, counts = [], []
        taken = None
        for _ in range(max(1, snapshots)):
            before = tracer.count
            start = time.perf_counter()
            taken = source.snapshot()
            walls.append(time.perf_counter() - start)
            counts.append(tracer.count - before)
        events = _watch(source, watch_s) if watch_s > 0 else None
        calls = tracer.classes()  # vetd's own calls; the probes below are not among them
        probes = _probes(source)
        result = Survey(
            library=library,
            driver_version=taken.driver_version if taken else None,
            nvml_version=_safe(n.nvmlSystemGetNVMLVersion),
            pynvml_version=_pynvml_version(),
            gpus=len(taken.gpus) if taken else 0,
            gpu_names=[gpu.name for gpu in taken.gpus] if taken else [],
            snapshots=len(walls),
            first_snapshot_ms=round(1e3 * walls[0], 3),
            snapshot_ms_median=round(1e3 * statistics.median(walls[1:] or walls), 3),
            snapshot_ms_max=round(1e3 * max(walls[1:] or walls), 3),
            calls_per_snapshot=int(statistics.median(counts[1:] or counts)),
            events=events,
            probes=probes,
        )
    finally:
        restore()
    result.calls = calls
    return result


def _safe(read: Callable[[], Any]) -> str | None:
    try:
        value = read()
    except Exception:  # noqa: BLE001 - an optional reading: None says it could not be had
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _pynvml_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nvidia-ml-py")
    except metadata.PackageNotFoundError:
        return "unknown"


def differences(real: Survey, simulated: Survey) -> list[str]:
    """Call classes where the simulation answers otherwise than the driver did, one line each."""
    ours, theirs = simulated.by_key(), real.by_key()
    lines = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = theirs.get(key), ours.get(key)
        if a is None or b is None:
            lines.append(f"{key}: called {'only by the simulation' if a is None else 'only on the driver'} "
                         f"({', '.join(sorted((b or a).outcomes))})")  # type: ignore[union-attr]
        elif set(a.outcomes) != set(b.outcomes):
            lines.append(f"{key}: driver {', '.join(sorted(a.outcomes))} / "
                         f"simulation {', '.join(sorted(b.outcomes))}")
    return lines
