"""Check and telemetry objects, their registries, and running them safely.

A check's ``run()`` is ordinary blocking code (NVML, psutil, file reads). The
agent runs it in a thread of its own with a deadline: an exception becomes an
``error`` outcome, an overrun a ``timeout`` outcome, and a run that never
returns keeps its thread parked while later runs report ``still_running``
instead of piling up more stuck threads. Nothing a check does can stop the
event loop, the other checks or the watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

import msgspec

from vetd.core.protocol import STATUSES, Status

T = TypeVar("T")
ItemT = TypeVar("ItemT", bound="Named")

DEFAULT_PROFILES = frozenset({"periodic"})

#: The profile checks are being run for (``prolog``, ``full``…; ``""``: checks
#: named one by one, ``periodic``: the daemon's schedule). Set by ``vetd check``
#: and ``revet``; a check reads it with :func:`current_profile` to size its work
#: (a GPU memtest over 2 % of memory in a prolog, 80 % in ``full``).
PROFILE: contextvars.ContextVar[str] = contextvars.ContextVar("vetd_profile", default="periodic")


def current_profile() -> str:
    """The profile the running check was started for (see :data:`PROFILE`)."""
    return PROFILE.get()


#: The GPUs of the job the checks are run for, as Slurm names them (``SLURM_JOB_GPUS``: ``"0,3"`` or
#: UUIDs), set when a prolog asks the agent to run them; None: the process environment says (the
#: one-shot ``vetd check`` in a prolog), else every GPU is the job's.
JOB_GPUS: contextvars.ContextVar[str | None] = contextvars.ContextVar("vetd_job_gpus", default=None)


def current_job_gpus() -> str | None:
    """The job's GPUs the running check was started for (see :data:`JOB_GPUS`), or None."""
    return JOB_GPUS.get()
MAX_MESSAGE_CHARS = 1000


class Outcome(msgspec.Struct, kw_only=True):
    """What a check says about one entity."""

    status: Status
    entity: str = "node"
    codes: list[str] = []
    metrics: dict[str, float] = {}
    message: str = ""


CheckFunc = Callable[[], "Outcome | Iterable[Outcome]"]


@dataclass(frozen=True)
class Check:
    """A named vetting check declared by a plugin.

    ``func`` does the work and returns one :class:`Outcome` or several (one per
    GPU, path, NIC…). ``interval`` ``None`` means the agent's ``[agent] interval``.
    ``profiles`` say when it runs: ``periodic`` in the daemon, ``prolog`` before
    a job, ``full`` for deep vetting.
    """

    name: str
    func: CheckFunc
    timeout: float = 10.0
    interval: float | None = None
    profiles: frozenset[str] = DEFAULT_PROFILES
    description: str = ""
    plugin: str = ""

    def run(self) -> list[Outcome]:
        """Run the check once, blocking; validates what ``func`` returned."""
        return normalize(self.func())


@dataclass(frozen=True)
class TelemetrySource:
    """A sampler: ``func`` returns ``{entity: {metric: value}}``.

    ``func`` is called every ``interval`` (``None``: ``[agent] telemetry_interval``)
    in a thread under ``timeout``. Without ``window`` each sample is published as
    it is; with ``window`` (seconds) the agent folds the samples of each entity
    into one message per window (mean, min and max of each metric, the sample
    count), tagged with the job running on that entity (:mod:`vetd.agent.telemetry`).
    """

    name: str
    func: Callable[[], Mapping[str, Mapping[str, float]]]
    interval: float | None = None
    timeout: float = 5.0
    plugin: str = ""
    window: float | None = None


class EventOutcome(msgspec.Struct, kw_only=True):
    """Something an event source saw happen."""

    name: str
    severity: Literal["info", "warning", "critical"] = "info"
    entity: str = "node"
    codes: list[str] = []
    metrics: dict[str, float] = {}
    message: str = ""
    #: Structured details by name (``job_start``'s ``user``, ``gpus``): the event's ``data`` on the wire.
    data: dict[str, str] = {}


Emit = Callable[[EventOutcome], None]


class SourceUnavailable(Exception):
    """An event source cannot run on this node (no device, no permission); not retried."""


@dataclass(frozen=True)
class EventSource:
    """A watcher: ``run(emit, stop)`` blocks, calling ``emit`` per event, until ``stop`` is set.

    ``recheck`` names periodic checks to run at once after a warning or
    critical event from this source, so their verdict (which GPU, what it
    needs) follows the event within seconds instead of an interval later.
    """

    name: str
    run: Callable[[Emit, threading.Event], None]
    plugin: str = ""
    recheck: tuple[str, ...] = ()


class Named(Protocol):
    """What a registry holds: a frozen dataclass with a name and the plugin that added it."""

    @property
    def name(self) -> str: ...

    @property
    def plugin(self) -> str: ...


class RegistryError(ValueError):
    """A plugin registered something invalid (duplicate or bad name)."""


class _Registry(Generic[ItemT]):
    def __init__(self) -> None:
        self._items: dict[str, ItemT] = {}
        self.plugin = ""

    def add(self, item: ItemT) -> None:
        if not item.name or not item.name.replace("_", "a").replace("-", "a").isalnum():
            raise RegistryError(f"invalid name {item.name!r} from plugin {self.plugin!r}")
        if item.name in self._items:
            other = self._items[item.name].plugin
            raise RegistryError(f"{item.name!r} registered by both {other!r} and {self.plugin!r}")
        if not item.plugin:
            item = _with_plugin(item, self.plugin)
        self._items[item.name] = item

    def __iter__(self) -> Iterator[ItemT]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> ItemT | None:
        return self._items.get(name)

    def names(self) -> list[str]:
        return sorted(self._items)


def _with_plugin(item: Any, plugin: str) -> Any:
    return replace(item, plugin=plugin)


class CheckRegistry(_Registry[Check]):
    """Where plugins add their checks (``registry.add(Check(...))``)."""


class TelemetryRegistry(_Registry[TelemetrySource]):
    """Where plugins add their telemetry sources."""


class EventSourceRegistry(_Registry[EventSource]):
    """Where plugins add their event sources."""


class PluginConfigs(Mapping[str, msgspec.Struct]):
    """Decoded ``[plugins.NAME]`` tables, by table name."""

    def __init__(self, tables: Mapping[str, msgspec.Struct]) -> None:
        self._tables = dict(tables)

    # One object per config load: plugins key their per-load state on it.
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __getitem__(self, key: str) -> msgspec.Struct:
        return self._tables[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def typed(self, key: str, type_: type[T]) -> T:
        """The table ``key``, checked to be of ``type_``."""
        value = self._tables[key]
        if not isinstance(value, type_):
            raise TypeError(f"config table {key!r} is {type(value).__name__}, not {type_.__name__}")
        return value


def normalize(returned: object) -> list[Outcome]:
    """Validate what a check returned; anything malformed raises ``TypeError``."""
    items = [returned] if isinstance(returned, Outcome) else returned
    if not isinstance(items, Iterable) or isinstance(items, str | bytes | Mapping):
        raise TypeError(f"check returned {type(returned).__name__}, not Outcome(s)")
    outcomes = []
    for item in items:
        if not isinstance(item, Outcome):
            raise TypeError(f"check returned a {type(item).__name__} among its outcomes")
        if item.status not in STATUSES:
            raise TypeError(f"check returned unknown status {item.status!r}")
        metrics = {}
        for key, value in item.metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"metric {key!r} is {type(value).__name__}, not a number")
            metrics[str(key)] = float(value)
        outcomes.append(
            msgspec.structs.replace(
                item,
                codes=[str(code) for code in item.codes],
                metrics=metrics,
                message=clip(item.message),
            )
        )
    if not outcomes:
        raise TypeError("check returned no outcome")
    return outcomes


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CheckTimeout(Exception):
    """The work did not finish before its deadline."""


async def in_thread(func: Callable[[], T], timeout: float, name: str) -> T:
    """Run blocking ``func`` in a fresh daemon thread, waiting at most ``timeout``.

    On timeout the thread is left to finish (Python cannot kill it) and
    :class:`CheckTimeout` is raised; the thread is returned as its ``args[0]``
    so callers can watch it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # the caller's profile (as asyncio.to_thread does)

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def target() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = context.run(func)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a result
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, value, error)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        raise CheckTimeout(thread) from None


@dataclass
class CheckRun:
    """The outcomes of one run of a check, with timing."""

    check: Check
    outcomes: list[Outcome]
    started: float
    duration_s: float


@dataclass
class CheckRunner:
    """Runs checks with deadlines and remembers which ones are stuck."""

    _stuck: dict[str, tuple[threading.Thread, float]] = field(default_factory=dict)

    async def run(self, check: Check, timeout: float | None = None) -> CheckRun:
        limit = check.timeout if timeout is None else timeout
        started = time.time()
        clock = time.monotonic()
        stuck = self._stuck.get(check.name)
        if stuck is not None:
            thread, since = stuck
            if thread.is_alive():
                waited = time.monotonic() - since
                outcome = Outcome(
                    status="timeout",
                    codes=["still_running"],
                    metrics={"stuck_s": round(waited, 3)},
                    message=f"previous run has not returned after {waited:.1f}s; not started again",
                )
                return CheckRun(check, [outcome], started, 0.0)
            del self._stuck[check.name]
        try:
            outcomes = await in_thread(check.run, limit, name=f"vetd[{check.plugin}].{check.name}")
        except CheckTimeout as exc:
            self._stuck[check.name] = (exc.args[0], clock)
            outcomes = [
                Outcome(
                    status="timeout",
                    codes=["timeout"],
                    metrics={"timeout_s": limit},
                    message=f"did not finish within {limit:g}s",
                )
            ]
        except Exception as exc:  # noqa: BLE001 - a check's failure is a result
            outcomes = [
                Outcome(
                    status="error",
                    codes=["exception"],
                    message=clip(f"{type(exc).__name__}: {exc}"),
                )
            ]
        return CheckRun(check, outcomes, started, time.monotonic() - clock)
