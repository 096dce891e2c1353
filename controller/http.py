"""The controller's HTTP endpoints: Prometheus metrics, a read API, token-guarded changes.

* ``GET /metrics``: Prometheus exposition (counters, errors per rule, nodes by
  state, open breakers, and the process's memory and descriptors), OpenMetrics
  when the scraper asks for it.
* ``GET /healthz``: ``{"status": "ok"}`` while the controller's loop answers.
* ``GET /api/v1/nodes``: what ``vetd nodes --json`` prints.
* ``GET /api/v1/jobs`` (``?node=N&failed=1&since=24h&limit=200``) and
  ``GET /api/v1/jobs/ID`` (``?run=N``): what ``vetd jobs --json`` and ``vetd job ID --json`` print.
* ``GET /api/v1/campaigns`` (``?since=24h&limit=200``) and ``GET /api/v1/campaigns/ID``: what
  ``vetd campaigns --json`` and ``vetd campaigns show ID --json`` print.
* ``POST /api/v1/drain`` ``{"nodes": "nid[001-004]", "reason": "…"}`` and
  ``POST /api/v1/resume`` ``{"nodes": "…"}``: need ``Authorization: Bearer
  <token>`` with the token from ``[http] token_file``; without a token file,
  state cannot be changed over HTTP at all. Accepted changes are queued in the
  store as operator requests (``202 {"request": ID, "nodes": [...]}``).

It listens on ``[http] listen`` (``127.0.0.1:9464``: this host only; empty:
off). uvicorn (its h11 protocol) serves a Starlette app inside the
controller's own event loop, so handlers run on the loop's thread beside the
store. One client cannot take the controller down: the request head, the
body, the open connections and every wait are bounded by ``[http]`` (see
:class:`~vetd.controller.config.HttpSection` for what happens at each bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from argparse import ArgumentTypeError
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import h11
import structlog
import uvicorn
from ClusterShell.NodeSet import NodeSet, NodeSetException
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vetd.controller.config import HttpSection
from vetd.controller.counters import RULE_ERRORS
from vetd.controller.store import Store
from vetd.controller.telemetry import GPU_METRICS, HOST_METRICS, Current
from vetd.controller.views import campaign_detail, campaign_summaries, job_detail, job_summaries
from vetd.core.cli import since
from vetd.core.protocol import valid_name

log = structlog.get_logger("vetd.http")

#: At most one warning this often about connections refused at ``max_connections``.
REFUSED_LOG_S = 60.0

#: Every state a node can be in, each always exported (0 when none) so a dashboard's series never vanish.
NODE_STATES = ("healthy", "suspect", "excluded", "healing", "probation", "failed")


class FleetCollector(Collector):
    """The controller's metrics, read from the store at each scrape (nothing kept twice)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        events, rule_errors, nodes, online, breakers = self._families()
        for name, value in sorted(self.store.counters().items()):
            if name.startswith(RULE_ERRORS):
                rule_errors.add_metric([name.removeprefix(RULE_ERRORS)], value)
            else:
                events.add_metric([name], value)
        states = dict.fromkeys(NODE_STATES, 0)
        up = 0
        for node in self.store.nodes.values():
            states[node.state] = states.get(node.state, 0) + 1
            up += node.online
        for state, count in states.items():
            nodes.add_metric([state], count)
        online.add_metric([], up)
        for row in self.store.breakers():
            breakers.add_metric([row["partition"]], int(row["open"]))
        return [events, rule_errors, nodes, online, breakers]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             GaugeMetricFamily]:
        return (
            CounterMetricFamily("vetd_controller_events", "Controller counters (messages, rules, actions).",
                                labels=["event"]),
            CounterMetricFamily("vetd_rule_errors", "Evaluations of a rule's condition that errored, by rule.",
                                labels=["rule"]),
            GaugeMetricFamily("vetd_nodes", "Nodes known to vetd, by state.", labels=["state"]),
            GaugeMetricFamily("vetd_nodes_online", "Nodes whose agent is connected.", labels=[]),
            GaugeMetricFamily("vetd_breaker_open", "1 while the exclusion circuit breaker of a partition is open.",
                              labels=["partition"]),
        )


class TelemetryCollector(Collector):
    """Each GPU's and node's latest telemetry window (its means), as gauges with labels ``node``,
    ``gpu`` (the index) and ``job`` (empty when none): ``vetd_gpu_power_w{node="nid001",gpu="3",job="4242"}``,
    ``vetd_node_cpu_pct{node=…,job=…}``. Only the metrics the telemetry plugin defines are exported, and
    only windows that arrived within ``[telemetry] current_for``: a GPU that stops reporting leaves."""

    def __init__(self, current: Callable[[], list[Current]]) -> None:
        self.current = current

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for window in self.current():
            gpu = window.entity.removeprefix("gpu")
            if window.entity.startswith("gpu") and gpu.isdigit():
                prefix, labels, known = "vetd_gpu_", [window.node, gpu, window.job or ""], GPU_METRICS
            elif window.entity == "node":
                prefix, labels, known = "vetd_node_", [window.node, window.job or ""], HOST_METRICS
            else:
                continue
            for metric, value in window.mean.items():
                if metric in known:
                    families[prefix + metric].add_metric(labels, value)
        return list(families.values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        gpus = {f"vetd_gpu_{name}": GaugeMetricFamily(f"vetd_gpu_{name}", text, labels=["node", "gpu", "job"])
                for name, text in GPU_METRICS.items()}
        hosts = {f"vetd_node_{name}": GaugeMetricFamily(f"vetd_node_{name}", text, labels=["node", "job"])
                 for name, text in HOST_METRICS.items()}
        return gpus | hosts


class BodyTooLarge(Exception):
    """The request body is over ``[http] max_body_kib``."""


def _since_and_limit(query: Mapping[str, str]) -> tuple[float | None, int]:
    """A listing's ``since`` (a duration back or an ISO time) and ``limit`` (1 to 10,000; 200);
    ``ValueError`` or ``ArgumentTypeError`` says which is wrong."""
    when = since(query["since"]) if "since" in query else None
    limit = int(query.get("limit", "200"))
    if not 1 <= limit <= 10_000:
        raise ValueError("limit: 1 to 10000")
    return when, limit


def _json(status: int, value: object, *, close: bool = False) -> JSONResponse:
    return JSONResponse(value, status, headers={"Connection": "close"} if close else None)


class HttpApi:
    """The endpoints as a Starlette app, and :meth:`serve` to run it under uvicorn."""

    def __init__(self, store: Store, nodes: Callable[[], list[dict[str, Any]]], token: str, cluster: str,
                 settings: HttpSection, telemetry: Callable[[], list[Current]] | None = None) -> None:
        self.store, self.nodes, self.token, self.cluster = store, nodes, token, cluster
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(FleetCollector(store))
        if telemetry is not None:
            self.registry.register(TelemetryCollector(telemetry))
        ProcessCollector(registry=self.registry)
        # Every handler is a coroutine: Starlette runs plain functions in a thread
        # pool, and the store's SQLite connection belongs to the loop's thread.
        self.app = Starlette(
            routes=[
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/api/v1/nodes", self._nodes, methods=["GET"]),
                Route("/api/v1/jobs", self._jobs, methods=["GET"]),
                Route("/api/v1/jobs/{job_id}", self._job, methods=["GET"]),
                Route("/api/v1/campaigns", self._campaigns, methods=["GET"]),
                Route("/api/v1/campaigns/{campaign_id}", self._campaign, methods=["GET"]),
                Route("/api/v1/drain", self._change, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
                Route("/api/v1/resume", self._change, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    # -- serving --------------------------------------------------------

    async def serve(self, host: str, port: int) -> None:
        """Serve until cancelled, then stop accepting, let requests in flight finish
        (up to ``request_timeout``) and close every connection."""
        settings = self.settings
        try:
            sock = listening_socket(host, port, settings.backlog)
        except OSError as exc:  # a taken port must not take the controller down with it
            log.error("http_unavailable", address=f"{host}:{port}", error=str(exc))
            return
        config = uvicorn.Config(
            Deadline(self.app, float(settings.request_timeout)),
            http=limited_h11(settings),
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            backlog=settings.backlog,
            h11_max_incomplete_event_size=settings.max_header_kib * 1024,
            timeout_keep_alive=max(1, round(float(settings.keep_alive))),
            timeout_graceful_shutdown=max(1, round(float(settings.request_timeout))),
        )
        server = EmbeddedServer(config)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines; ours say it
        log.info("http_listening", address=f"{host}:{port}", state_changes="token" if self.token else "off",
                 max_connections=settings.max_connections)
        try:
            await server.serve(sockets=[sock])
        except asyncio.CancelledError:
            if server.started:
                await server.shutdown(sockets=[sock])
            raise
        finally:
            sock.close()

    # -- endpoints ------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.registry), headers={"Content-Type": content_type})

    async def _healthz(self, request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def _nodes(self, request: Request) -> Response:
        return _json(200, self.nodes())

    async def _jobs(self, request: Request) -> Response:
        query = request.query_params
        unknown = sorted(set(query) - {"node", "failed", "since", "limit"})
        if unknown:
            return _json(400, {"error": f"unknown parameter {unknown[0]!r} (node, failed, since, limit)"})
        try:
            node = query.get("node")
            if node is not None and not valid_name(node):
                raise ValueError(f"node: {node[:64]!r} is not a node name")
            failed = {"": False, "0": False, "false": False, "1": True, "true": True}.get(query.get("failed", ""))
            if failed is None:
                raise ValueError("failed: 1, true, 0 or false")
            when, limit = _since_and_limit(query)
        except (ValueError, ArgumentTypeError) as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, job_summaries(self.store, self.cluster, node=node, failed=failed, since=when, limit=limit))

    async def _job(self, request: Request) -> Response:
        run = request.query_params.get("run", "0")
        if not run.isdigit() or set(request.query_params) - {"run"}:
            return _json(400, {"error": "the one parameter is run, a number (1: the run before the latest)"})
        detail = job_detail(self.store, self.cluster, request.path_params["job_id"], int(run))
        return _json(404, {"error": "no such job"}) if detail is None else _json(200, detail)

    async def _campaigns(self, request: Request) -> Response:
        query = request.query_params
        unknown = sorted(set(query) - {"since", "limit"})
        if unknown:
            return _json(400, {"error": f"unknown parameter {unknown[0]!r} (since, limit)"})
        try:
            when, limit = _since_and_limit(query)
        except (ValueError, ArgumentTypeError) as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, campaign_summaries(self.store, self.cluster, since=when, limit=limit))

    async def _campaign(self, request: Request) -> Response:
        if request.query_params:
            return _json(400, {"error": "no parameters"})
        detail = campaign_detail(self.store, self.cluster, request.path_params["campaign_id"])
        return _json(404, {"error": "no such campaign"}) if detail is None else _json(200, detail)

    async def _change(self, request: Request) -> Response:
        action = request.url.path.rsplit("/", 1)[1]
        if request.method != "POST":
            return _json(405, {"error": "POST only"})
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_kib * 1024:
            return _json(413, {"error": "body too large"}, close=True)
        if not self.token:
            return _json(403, {"error": "state changes over HTTP are off (set [http] token_file)"}, close=True)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            log.warning("http_unauthorized", action=action)
            return _json(401, {"error": "a valid bearer token is required"}, close=True)
        try:
            body = await self._body(request)
        except BodyTooLarge:
            return _json(413, {"error": "body too large"}, close=True)
        try:
            data = json.loads(body or b"{}")
            names = [str(n) for n in NodeSet(str(data["nodes"]))]
            reason = str(data.get("reason", "")) if action == "drain" else ""
        except (ValueError, KeyError, TypeError, NodeSetException) as exc:
            return _json(400, {"error": f"expected {{\"nodes\": HOSTLIST, \"reason\": TEXT}}: {exc}"})
        if action == "drain" and not reason:
            return _json(400, {"error": "a drain needs a reason"})
        targets, problems = self.store.resolve_nodes(names, self.cluster)
        if problems:
            return _json(400, {"error": "; ".join(problems)})
        request_id = self.store.submit("http", action, targets, reason)
        return _json(202, {"request": request_id, "nodes": names})

    async def _body(self, request: Request) -> bytes:
        """The body, refused as soon as it grows past the limit (a chunked body announces no length)."""
        limit, size, chunks = self.settings.max_body_kib * 1024, 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _json(405, {"error": "GET only"})
        return _json(exc.status_code, {"error": "not found" if exc.status_code == 404 else str(exc.detail)})


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """Bound here so that a taken port is an error we log (uvicorn would exit the
    process). Made with ``IPPROTO_TCP``, as asyncio's own are: asyncio sets
    TCP_NODELAY only on such sockets, and without it every kept-alive answer
    waits 40 ms for a delayed ACK."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class Deadline:
    """ASGI middleware: a request (reading its body included) must be answered within
    ``seconds``; else ``408`` if nothing was sent yet, and the connection is closed."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(self.seconds):
                await self.app(scope, receive, tracked)
        except TimeoutError:
            log.warning("http_request_timeout", path=scope.get("path", ""), seconds=self.seconds)
            if not started:
                await _json(408, {"error": "request timed out"}, close=True)(scope, receive, send)


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the controller's loop: the controller owns SIGTERM/SIGINT
    (``vetd.core.signals``), so uvicorn must not install handlers of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with the bounds uvicorn does not have.

    * At most ``max_connections`` open: one more is closed as soon as it is
      accepted, so clients can never take the descriptors the controller needs
      for its database, its broker link and scontrol. (uvicorn's
      ``limit_concurrency`` answers requests with 503 but keeps every
      connection, and its descriptor, open.)
    * A request head (line and headers) must arrive within ``header_timeout``
      of the connection opening or of the previous answer; uvicorn itself
      never times out a connection that has not sent a whole request.
    * An answer given before the request's body was read (413, 401, 408) ends
      the connection, so the rest of that body is never waited for.
    * A client that stops reading an answer is dropped after ``request_timeout``
      with its write buffer, rather than holding a connection for ever.
    """

    max_connections = 100
    header_timeout = 10.0
    keep_alive = 5.0
    request_timeout = 10.0
    _head_deadline: asyncio.TimerHandle | None = None
    _write_deadline: asyncio.TimerHandle | None = None
    #: Connections refused since the last warning about it (one warning a minute at most).
    refused = 0
    refused_logged = -REFUSED_LOG_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()
            cls = type(self)
            cls.refused += 1
            if (now := self.loop.time()) - cls.refused_logged >= REFUSED_LOG_S:
                log.warning("http_connections_refused", count=cls.refused, limit=self.max_connections)
                cls.refused, cls.refused_logged = 0, now
            return
        self.timeout_keep_alive = self.keep_alive  # type: ignore[assignment]
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._cancel_write_deadline()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.request_timeout, self._not_reading)

    def resume_writing(self) -> None:
        self._cancel_write_deadline()
        super().resume_writing()

    def _not_reading(self) -> None:
        self._write_deadline = None
        log.info("http_client_not_reading", client=f"{self.client[0]}:{self.client[1]}" if self.client else "")
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()
        elif self._head_deadline is None and not self.transport.is_closing():
            # a new request's head has begun on a kept-alive connection
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete
                and self.conn.their_state is h11.SEND_BODY):
            self.transport.close()

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("http_header_timeout", client=f"{self.client[0]}:{self.client[1]}" if self.client else "")
            self.transport.abort()

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None


def limited_h11(settings: HttpSection) -> type[LimitedH11]:
    """:class:`LimitedH11` with this config's bounds (uvicorn builds one protocol per connection from a class)."""
    return type("LimitedH11", (LimitedH11,), {
        "max_connections": settings.max_connections,
        "header_timeout": float(settings.header_timeout),
        "keep_alive": float(settings.keep_alive),
        "request_timeout": float(settings.request_timeout),
    })
