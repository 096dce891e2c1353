"""The agent's local control socket (``[agent] control_socket``).

Local tools (``vetd-oci-hook``, a prolog, an operator's shell) ask the agent
over a Unix socket, root only by default (mode 0600; ``control_socket_group``
makes it 0660 for that group). One JSON object per line each way; a client may
send several requests on one connection. Every request has an ``op``:

- ``status``: node, cluster, session, whether the broker is connected, the
  node's service state, running jobs and containers.
- ``verdicts`` (``checks`` optional): the latest result of every check per entity.
- ``run`` (``profile`` or ``checks``; ``deadline``, ``gpus`` optional): runs them
  now through the daemon's check runner (each under its timeout, cut to the
  deadline), publishes the results and answers with them; with ``gpus`` the GPU
  checks judge those GPUs only, as in a prolog.
- ``job_start`` (``job_id``, ``user``, ``gpus``) / ``job_end`` (``job_id``,
  ``exit_code``, ``state``): ``job_start``/``job_end`` events whose contents
  :mod:`vetd.core.jobs` defines (the controller ties the job's outcome to its
  nodes from them); results and events published while one job runs carry its
  id; the warning and critical events seen during a job (an XID on one of its
  GPUs) come back with its end.
- ``container_start`` (``id``, ``annotations``, ``deadline``): may this container
  start? ``allowed`` and a one-line ``reason``. ``container_end`` (``id``).
- ``report`` (``check``, ``results``, ``job_id``): publishes results a local tool
  measured (``vetd vet``'s ``fabric_pairs`` verdict for this node), tagged with
  the job; never a check the agent runs itself, and not counted in the
  node's service state (the controller's rules judge them).

Every answer has ``ok``; a bad request gets ``ok: false`` and an ``error`` that
says what is wrong, and the connection stays usable. Lines are bounded
(:data:`~vetd.agent.controlclient.MAX_LINE`), so are clients at once
(``control_max_clients``) and idle connections (:data:`IDLE_S`). Checks run in
threads and subprocesses, never on the event loop: a slow check holds up only
the client that asked for it.

The service state joins the controller's word and the agent's own view. The
controller tells the agent, in a retained notice, whether it took the node out
of service (:class:`~vetd.core.protocol.ServiceNotice`): ``excluded`` or
``drained`` then, with its reason. Otherwise the node is ``unfit`` while a
check's latest verdict is ``fail``, ``error`` or ``timeout``, and
``in_service`` when neither says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import math
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import structlog

from vetd.agent.checks import JOB_GPUS, PROFILE, Check, CheckRun, CheckRunner, EventOutcome, Outcome
from vetd.agent.config import AgentConfig
from vetd.agent.controlclient import MAX_LINE
from vetd.agent.requirements import evaluate
from vetd.core.jobs import end_fields, start_fields
from vetd.core.mqtt import Backoff
from vetd.core.protocol import BAD_STATUSES, JobId, ServiceNotice, Status

log = structlog.get_logger("vetd.control")

#: A connection with no request for this long is closed.
IDLE_S = 60.0
#: Containers and jobs the agent remembers at once (a runtime that never calls poststop cannot fill memory).
MAX_TRACKED = 1024
#: Warning and critical events a job keeps (the first ones; later ones are counted).
MAX_JOB_EVENTS = 32
#: Of a ``run``'s deadline, what each check may use: the rest is for answering in time.
RUN_DEADLINE_SHARE = 0.9

_Word = Annotated[str, msgspec.Meta(max_length=256)]
_Names = Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]], msgspec.Meta(max_length=256)]
_ContainerId = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}\Z")]


class StatusRequest(msgspec.Struct, tag="status", tag_field="op", forbid_unknown_fields=True):
    pass


class VerdictsRequest(msgspec.Struct, tag="verdicts", tag_field="op", forbid_unknown_fields=True):
    checks: _Names = []


class RunRequest(msgspec.Struct, tag="run", tag_field="op", forbid_unknown_fields=True):
    profile: Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9_.-]{0,64}\Z")] = ""
    checks: _Names = []
    #: Seconds the caller waits; each check's timeout is cut to fit (0: the checks' own timeouts).
    deadline: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 0.0
    #: The job's GPUs (``SLURM_JOB_GPUS``: indices or UUIDs): GPU checks judge these only; empty: all.
    gpus: _Word = ""


class JobStartRequest(msgspec.Struct, tag="job_start", tag_field="op", forbid_unknown_fields=True):
    job_id: Annotated[JobId, msgspec.Meta(min_length=1)]
    user: _Word = ""
    gpus: _Word = ""


class JobEndRequest(msgspec.Struct, tag="job_end", tag_field="op", forbid_unknown_fields=True):
    job_id: Annotated[JobId, msgspec.Meta(min_length=1)]
    exit_code: int | None = None
    state: _Word = ""
    #: The signal that ended the job's script, if one did.
    signal: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    #: The highest exit code of the job's steps (Slurm's derived exit code).
    derived_exit_code: int | None = None


class ContainerStartRequest(msgspec.Struct, tag="container_start", tag_field="op", forbid_unknown_fields=True):
    id: _ContainerId
    annotations: Annotated[dict[Annotated[str, msgspec.Meta(max_length=256)],
                                Annotated[str, msgspec.Meta(max_length=4096)]],
                           msgspec.Meta(max_length=256)] = {}
    pid: Annotated[int, msgspec.Meta(ge=0)] = 0
    bundle: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    #: Seconds the caller waits for the answer; the agent answers within it.
    deadline: Annotated[float, msgspec.Meta(gt=0.0, le=60.0)] = 5.0


class ContainerEndRequest(msgspec.Struct, tag="container_end", tag_field="op", forbid_unknown_fields=True):
    id: _ContainerId


class Reported(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One result a local tool measured (``vetd vet``'s verdict for this node)."""

    status: Status
    entity: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "node"
    codes: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=32)] = []
    metrics: Annotated[dict[Annotated[str, msgspec.Meta(max_length=128)], float], msgspec.Meta(max_length=256)] = {}
    message: Annotated[str, msgspec.Meta(max_length=4000)] = ""


class ReportRequest(msgspec.Struct, tag="report", tag_field="op", forbid_unknown_fields=True):
    #: Not a check the agent runs itself: a tool cannot speak for those.
    check: Annotated[str, msgspec.Meta(pattern=r"\A[a-z][a-z0-9_]{0,63}\Z")]
    results: Annotated[list[Reported], msgspec.Meta(min_length=1, max_length=64)]
    job_id: JobId = ""
    duration_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0


Request = (StatusRequest | VerdictsRequest | RunRequest | JobStartRequest | JobEndRequest
           | ContainerStartRequest | ContainerEndRequest | ReportRequest)


class Verdict(msgspec.Struct, kw_only=True):
    check: str
    entity: str
    status: str
    codes: list[str] = []
    metrics: dict[str, float | None] = {}
    message: str = ""
    ts: float = 0.0
    duration_s: float = 0.0
    profile: str = ""
    job_id: str | None = None


class ControllerView(msgspec.Struct, kw_only=True):
    """What the controller last said about this node (its retained service notice)."""

    #: ``in_service``, ``excluded`` (out of service in vetd) or ``drained`` (and in the scheduler).
    service: str
    #: The controller's node state (``healthy``, ``suspect``, ``excluded``, ``healing``…).
    state: str = ""
    reason: str = ""
    since: float = 0.0
    #: The partition's circuit breaker is open: vetd drains nothing more there.
    breaker_open: bool = False
    #: When the agent received it.
    received: float = 0.0


class Service(msgspec.Struct, kw_only=True):
    #: ``in_service``: nothing the agent knows of stops work here; ``excluded`` / ``drained``: the
    #: controller took the node out of service; ``unfit``: a check's latest verdict is bad.
    state: Literal["in_service", "unfit", "excluded", "drained"]
    reason: str = ""
    #: ``check[entity]`` of every bad latest verdict.
    failing: list[str] = []
    #: What decided the state: ``controller`` (its notice says out of service) or ``verdicts`` (the agent's own).
    source: str = "verdicts"
    #: The controller's notice; None until one arrived (no controller yet, or an older one).
    controller: ControllerView | None = None


class JobEvent(msgspec.Struct, kw_only=True):
    """A warning or critical event seen while a job ran (an XID on one of its GPUs)."""

    name: str
    severity: str
    entity: str = "node"
    codes: list[str] = []
    message: str = ""
    ts: float = 0.0


class Job(msgspec.Struct, kw_only=True):
    id: str
    user: str = ""
    gpus: str = ""
    started: float = 0.0
    #: Warning and critical events while it ran, on the node or on its GPUs (the first :data:`MAX_JOB_EVENTS`).
    events: list[JobEvent] = []
    #: Events beyond those kept.
    events_dropped: int = 0

    def concerns(self, entity: str) -> bool:
        """Whether an event about ``entity`` is this job's: the node's, or one of its GPUs' (by index)."""
        match = re.fullmatch(r"gpu(\d+)", entity)
        indices = [part.strip() for part in self.gpus.split(",") if part.strip()]
        if match is None or not indices or not all(part.isdigit() for part in indices):
            return True  # a node event, or GPUs named by UUID: kept (vetd cannot tell)
        return match.group(1) in {str(int(part)) for part in indices}


class Container(msgspec.Struct, kw_only=True):
    id: str
    started: float = 0.0
    annotations: list[str] = []
    job_id: str | None = None


class Response(msgspec.Struct, kw_only=True):
    """Every answer has every key (empty when the request is not about it): a client reads what it asked for."""

    ok: bool
    error: str = ""
    node: str = ""
    cluster: str = ""
    session: str = ""
    broker_connected: bool | None = None
    service: Service | None = None
    verdicts: list[Verdict] = []
    jobs: list[Job] = []
    containers: list[Container] = []
    #: container_start: whether it may start, and if not, why (one line).
    allowed: bool | None = None
    reason: str = ""
    #: job_end: the job that ended, with the events seen while it ran (None: its start was not announced).
    job: Job | None = None
    #: job_end of a job that had ended already: the state it ended with (``prolog_failed``).
    ended: str = ""


_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


class NodeState:
    """What the agent knows locally: latest verdicts, running jobs and containers."""

    def __init__(self) -> None:
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        self.jobs: dict[str, Job] = {}
        self.containers: dict[str, Container] = {}
        #: The controller's retained service notice, and when it came (None: nothing heard).
        self.controller: ControllerView | None = None
        #: Jobs that ended lately, with the state they ended in: a second end (the epilog after a prolog
        #: that failed) is not an event.
        self.ended: dict[str, str] = {}

    def heard(self, notice: ServiceNotice | None) -> None:
        """The controller's service notice (None: it was cleared)."""
        self.controller = None if notice is None else ControllerView(
            service=notice.service, state=notice.state, reason=notice.reason, since=notice.since,
            breaker_open=notice.breaker_open, received=time.time())

    def saw(self, event: EventOutcome) -> None:
        """A warning or critical event: kept with each running job it concerns."""
        if event.severity == "info":
            return
        for job in self.jobs.values():
            if not job.concerns(event.entity):
                continue
            if len(job.events) >= MAX_JOB_EVENTS:
                job.events_dropped += 1
                continue
            job.events.append(JobEvent(name=event.name, severity=event.severity, entity=event.entity,
                                       codes=list(event.codes), message=event.message, ts=time.time()))

    def job_id(self) -> str | None:
        """The job running on the node, if exactly one is (a Result or Event carries one job id)."""
        return next(iter(self.jobs)) if len(self.jobs) == 1 else None

    def job_on(self, entity: str) -> str | None:
        """The job running on ``entity``, for telemetry windows.

        A GPU (``gpu3``) belongs to the one job whose ``gpus`` (``SLURM_JOB_GPUS``: ``0,3``, ``0-3``)
        list its index; if no job lists it, to the node's one job when that job named no GPUs
        (an exclusive node, or GPUs given by UUID). Anything else, or two jobs claiming one GPU:
        None. The node and its other entities belong to the node's one job (:meth:`job_id`).
        """
        if not (entity.startswith("gpu") and entity[3:].isdigit()):
            return self.job_id()
        index = int(entity[3:])
        claiming = [job.id for job in self.jobs.values() if index in gpu_indices(job.gpus)]
        if claiming:
            return claiming[0] if len(claiming) == 1 else None
        unlisted = [job.id for job in self.jobs.values() if not gpu_indices(job.gpus)]
        return unlisted[0] if len(unlisted) == 1 and len(self.jobs) == 1 else None

    def record(self, run: CheckRun, profile: str, job_id: str | None) -> None:
        """A check's run replaces every verdict it gave before (an entity it no longer reports is gone)."""
        for key in [k for k in self.verdicts if k[0] == run.check.name]:
            del self.verdicts[key]
        for outcome in run.outcomes:
            self.verdicts[(run.check.name, outcome.entity)] = verdict(run, outcome, profile, job_id)

    def service(self, ignore: Sequence[str] = ()) -> Service:
        """The controller's word when it took the node out of service, else the agent's own verdicts."""
        failing = [f"{v.check}[{v.entity}]" for v in self.verdicts.values()
                   if v.status in BAD_STATUSES and v.check not in ignore]
        view = self.controller
        if view is not None and view.service in ("excluded", "drained"):
            why = f": {view.reason}" if view.reason else ""
            return Service(state="drained" if view.service == "drained" else "excluded",
                           reason=f"{view.service} by the vetd controller ({view.state}){why}",
                           failing=sorted(failing), source="controller", controller=view)
        if not failing:
            return Service(state="in_service", controller=view)
        first = next(v for v in self.verdicts.values() if f"{v.check}[{v.entity}]" == failing[0])
        detail = f"{first.check}[{first.entity}] {first.status}" + (f": {first.message}" if first.message else "")
        more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
        return Service(state="unfit", reason=detail + more, failing=sorted(failing), controller=view)


def gpu_indices(gpus: str) -> frozenset[int]:
    """GPU indices a job's ``gpus`` names: ``0,3`` or Slurm's ``0-3,6``; UUIDs and junk name none."""
    indices: set[int] = set()
    for part in gpus.split(","):
        first, _, last = part.strip().partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            low, high = int(first), int(last or first)
            if high - low < 1024:
                indices.update(range(low, high + 1))
    return frozenset(indices)


def verdict(run: CheckRun, outcome: Outcome, profile: str, job_id: str | None) -> Verdict:
    return Verdict(check=run.check.name, entity=outcome.entity, status=outcome.status, codes=list(outcome.codes),
                   metrics={k: (v if math.isfinite(v) else None) for k, v in outcome.metrics.items()},
                   message=outcome.message, ts=run.started, duration_s=round(run.duration_s, 6),
                   profile=profile, job_id=job_id)


@dataclass
class ControlHost:
    """What the control socket uses of the daemon (callables: the daemon swaps its schedule on reload)."""

    config: Callable[[], AgentConfig]
    checks: Callable[[], Sequence[Check]]
    runner: CheckRunner
    state: NodeState
    #: Publish a run's results (and record its verdicts) under a profile.
    publish: Callable[[CheckRun, str], None]
    #: Publish an event (carrying the current job id).
    event: Callable[[EventOutcome, str | None], None]
    identity: Callable[[], tuple[str, str, str]]
    connected: Callable[[], bool]
    #: Publish results a local tool measured, tagged with their job (not recorded as the node's verdicts).
    report: Callable[[CheckRun, str | None], None] | None = None


class ControlServer:
    """The asyncio Unix-socket server; one task per client, checks off the loop."""

    def __init__(self, host: ControlHost) -> None:
        self.host = host
        self.path = host.config().agent.control_socket
        self._clients = asyncio.Semaphore(host.config().agent.control_max_clients)

    async def run_supervised(self) -> None:
        """:meth:`run`, started again with back-off when the socket cannot be made (the agent carries on)."""
        backoff = Backoff(base=1.0, cap=60.0)
        while True:
            try:
                await self.run()
            except OSError as exc:
                delay = backoff.next()
                log.error("control_socket_failed", path=self.path, error=str(exc), retry_s=round(delay, 1))
                await asyncio.sleep(delay)

    async def run(self) -> None:
        """Serve until cancelled; the socket file is removed on the way out."""
        server = await self._listen()
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(OSError):
                path = Path(self.path)
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    async def _listen(self) -> asyncio.AbstractServer:
        path = Path(self.path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if path.is_socket():
            if await self._alive():
                raise OSError(f"another agent answers on {path}")
            path.unlink()  # left by an agent that died
        config = self.host.config().agent
        # Bound under a staging name, given its mode and group, then renamed into place: the
        # socket never exists at its path with the umask's mode, not even for a moment.
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(staging))
            mode = 0o600
            if config.control_socket_group:
                try:
                    gid = grp.getgrnam(config.control_socket_group).gr_gid
                except KeyError:
                    log.error("control_socket_group_unknown", group=config.control_socket_group)
                else:
                    os.chown(staging, -1, gid)
                    mode = 0o660
            staging.chmod(mode)
            staging.replace(path)
            server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            staging.unlink(missing_ok=True)
            raise
        log.info("control_socket_listening", path=str(path), group=config.control_socket_group or None)
        return server

    async def _alive(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._clients:
            try:
                while True:
                    try:
                        line = await asyncio.wait_for(reader.readline(), IDLE_S)
                    except (ValueError, asyncio.LimitOverrunError):
                        await self._send(writer, Response(ok=False, error=f"request longer than {MAX_LINE} bytes"))
                        return
                    except TimeoutError:
                        return
                    if not line:
                        return
                    if not line.strip():
                        continue
                    await self._send(writer, await self.answer(line))
            except (ConnectionError, OSError):
                return  # the client went away
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: Response) -> None:
        writer.write(_encoder.encode(response) + b"\n")
        await writer.drain()

    async def answer(self, line: bytes) -> Response:
        """One request line → its response; nothing a client sends raises out of here."""
        try:
            request = _decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Response(ok=False, error=f"bad request: {exc}")
        try:
            response = await self._dispatch(request)
        except Exception as exc:  # an internal failure is an answer, never a dead server
            log.exception("control_request_failed", op=type(request).__name__)
            response = Response(ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
        response.cluster, response.node, response.session = self.host.identity()
        return response

    async def _dispatch(self, request: Request) -> Response:
        cluster, node, session = self.host.identity()
        base = {"node": node, "cluster": cluster, "session": session}
        state = self.host.state
        if isinstance(request, StatusRequest):
            return Response(ok=True, broker_connected=self.host.connected(), service=self._service(),
                            jobs=list(state.jobs.values()), containers=list(state.containers.values()))
        if isinstance(request, VerdictsRequest):
            wanted = set(request.checks)
            verdicts = [v for v in state.verdicts.values() if not wanted or v.check in wanted]
            return Response(ok=True, service=self._service(),
                            verdicts=sorted(verdicts, key=lambda v: (v.check, v.entity)))
        if isinstance(request, RunRequest):
            return await self._run(request, base)
        if isinstance(request, JobStartRequest):
            return self._job_start(request, base)
        if isinstance(request, JobEndRequest):
            return self._job_end(request, base)
        if isinstance(request, ContainerStartRequest):
            return await self._container_start(request, base)
        if isinstance(request, ReportRequest):
            return self._report(request)
        return self._container_end(request, base)

    def _service(self) -> Service:
        return self.host.state.service(self.host.config().hooks.ignore_checks)

    async def _run(self, request: RunRequest, base: dict[str, str]) -> Response:
        config = self.host.config()
        registered = {check.name: check for check in self.host.checks()}
        if request.checks:
            unknown = [name for name in request.checks if name not in registered]
            if unknown:
                return Response(ok=False, error=f"unknown check(s): {', '.join(unknown)}; "
                                f"available: {', '.join(sorted(registered))}")
            checks = [registered[name] for name in request.checks]
        elif request.profile:
            checks = config.profile_checks(request.profile, registered.values())
            if not checks:
                return Response(ok=False, error=f"no checks in profile {request.profile!r}")
        else:
            return Response(ok=False, error="run needs a profile or checks")
        cap = request.deadline * RUN_DEADLINE_SHARE if request.deadline else math.inf

        def timeout_of(check: Check) -> float:
            override = config.checks.get(check.name)
            own = float(override.timeout) if override is not None and override.timeout else check.timeout
            return max(0.01, min(own, cap))

        token, gpus = PROFILE.set(request.profile), JOB_GPUS.set(request.gpus or None)
        try:
            runs = await asyncio.gather(*(self.host.runner.run(check, timeout_of(check)) for check in checks))
        finally:
            JOB_GPUS.reset(gpus)
            PROFILE.reset(token)
        job = self.host.state.job_id()
        for run in runs:
            self.host.publish(run, request.profile)
        return Response(ok=True, service=self._service(),
                        verdicts=[verdict(run, outcome, request.profile, job)
                                  for run in runs for outcome in run.outcomes])

    def _report(self, request: ReportRequest) -> Response:
        if any(check.name == request.check for check in self.host.checks()):
            return Response(ok=False, error=f"{request.check} is a check this agent runs: only it reports that")
        if self.host.report is None:
            return Response(ok=False, error="this agent does not take reports")
        check = Check(request.check, lambda: [], plugin="report")
        outcomes = [Outcome(status=r.status, entity=r.entity, codes=list(r.codes),
                            metrics={k: v for k, v in r.metrics.items() if math.isfinite(v)}, message=r.message)
                    for r in request.results]
        self.host.report(CheckRun(check, outcomes, time.time() - request.duration_s, request.duration_s),
                         request.job_id or self.host.state.job_id())
        log.info("report_published", check=request.check, results=len(outcomes), job_id=request.job_id)
        return Response(ok=True)

    def _job_start(self, request: JobStartRequest, base: dict[str, str]) -> Response:
        jobs = self.host.state.jobs
        if request.job_id not in jobs and len(jobs) >= MAX_TRACKED:
            return Response(ok=False, error=f"{MAX_TRACKED} jobs already running; end some first")
        self.host.state.ended.pop(request.job_id, None)  # a requeued job may start here again
        jobs[request.job_id] = Job(id=request.job_id, user=request.user, gpus=request.gpus, started=time.time())
        self.host.event(EventOutcome(**start_fields(request.job_id, request.user, request.gpus)), request.job_id)
        log.info("job_started", job_id=request.job_id, user=request.user, gpus=request.gpus)
        return Response(ok=True, jobs=list(jobs.values()))

    def _job_end(self, request: JobEndRequest, base: dict[str, str]) -> Response:
        state = self.host.state
        job = state.jobs.pop(request.job_id, None)
        if job is None and request.job_id in state.ended:  # ended already: said once
            return Response(ok=True, jobs=list(state.jobs.values()), ended=state.ended[request.job_id] or "ended")
        state.ended[request.job_id] = request.state
        while len(state.ended) > MAX_TRACKED:
            state.ended.pop(next(iter(state.ended)))
        fields = end_fields(request.job_id, request.state, request.exit_code,
                            time.time() - job.started if job is not None else None, announced=job is not None)
        metrics = fields["metrics"]
        metrics.update({name: float(value) for name, value in (("signal", request.signal),
                                                               ("derived_exit_code", request.derived_exit_code))
                        if value is not None})
        if job is not None and (job.events or job.events_dropped):
            metrics["events"] = float(len(job.events) + job.events_dropped)
            metrics["critical_events"] = float(sum(1 for e in job.events if e.severity == "critical"))
        self.host.event(EventOutcome(**fields), request.job_id)
        log.info("job_ended", job_id=request.job_id, exit_code=request.exit_code, state=request.state,
                 known=job is not None, events=len(job.events) if job else 0)
        return Response(ok=True, jobs=list(state.jobs.values()), job=job)

    async def _container_start(self, request: ContainerStartRequest, base: dict[str, str]) -> Response:
        hooks = self.host.config().hooks
        # answer in time: leave the caller a margin to read the answer and print it
        budget = max(0.05, min(request.deadline, float(hooks.deadline)) * 0.8 - 0.1)
        reason = ""
        service = self._service()
        if hooks.refuse_when_unfit and service.state != "in_service":
            node = base["node"]
            reason = (f"node {node} is out of service ({service.reason}); submit again excluding {node} "
                      "(e.g. sbatch --exclude) and tell your site's admins if it persists")
        names: list[str] = []
        if not reason:
            names, problems = await evaluate(hooks.requirements(), request.annotations, budget)
            if problems:
                reason = (f"node {base['node']} lacks what the container's annotations ask for: {'; '.join(problems)}; "
                          "remove the annotation or run on another node, and tell your site's admins")
        reason = " ".join(reason.split())  # one line, whatever a message held
        job = self.host.state.job_id()
        if reason:
            self.host.event(EventOutcome(name="container_refused", entity=_entity(request.id), codes=names,
                                         message=reason), job)
            log.warning("container_refused", container=request.id, reason=reason)
            return Response(ok=True, allowed=False, reason=reason, service=service)
        containers = self.host.state.containers
        if request.id not in containers and len(containers) >= MAX_TRACKED:
            containers.pop(next(iter(containers)))  # the oldest: its poststop never came
        containers[request.id] = Container(id=request.id, started=time.time(), annotations=names, job_id=job)
        self.host.event(EventOutcome(name="container_start", entity=_entity(request.id), codes=names,
                                     message=f"container {request.id} started"
                                     + (f" with {', '.join(names)}" if names else "")), job)
        return Response(ok=True, allowed=True, service=service)

    def _container_end(self, request: ContainerEndRequest, base: dict[str, str]) -> Response:
        container = self.host.state.containers.pop(request.id, None)
        metrics = {"runtime_s": round(time.time() - container.started, 3)} if container else {}
        self.host.event(EventOutcome(name="container_end", entity=_entity(request.id), metrics=metrics,
                                     message=f"container {request.id} ended"),
                        container.job_id if container else self.host.state.job_id())
        return Response(ok=True)


def _entity(container_id: str) -> str:
    return f"container:{container_id[:100]}"
