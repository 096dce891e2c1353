"""The controller's HTTP endpoints: Prometheus metrics, a read API, token-guarded changes.

* ``GET /metrics``: Prometheus text format (counters, errors per rule, nodes by state, open breakers).
* ``GET /api/v1/nodes``: what ``vetd nodes --json`` prints.
* ``POST /api/v1/drain`` ``{"nodes": "nid[001-004]", "reason": "…"}`` and
  ``POST /api/v1/resume`` ``{"nodes": "…"}``: need ``Authorization: Bearer
  <token>`` with the token from ``[http] token_file``; without a token file,
  state cannot be changed over HTTP at all.

It listens on ``[http] listen`` (``127.0.0.1:9464``: this host only; empty:
off). A small HTTP/1.1 server on asyncio streams: one request per
connection, bodies up to 64 KiB.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from typing import Any

import structlog
from ClusterShell.NodeSet import NodeSet, NodeSetException

from vetd.controller.counters import RULE_ERRORS
from vetd.controller.store import Store

log = structlog.get_logger("vetd.http")

MAX_BODY = 64 * 1024
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large"}


def metrics_text(store: Store, counters: dict[str, int]) -> str:
    lines = ["# HELP vetd_controller_events_total Controller counters (messages, rules, actions).",
             "# TYPE vetd_controller_events_total counter"]
    per_rule = {name.removeprefix(RULE_ERRORS): value for name, value in counters.items()
                if name.startswith(RULE_ERRORS)}
    for name, value in sorted(counters.items()):
        if not name.startswith(RULE_ERRORS):
            lines.append(f'vetd_controller_events_total{{event="{name}"}} {value}')
    lines += ["# HELP vetd_rule_errors_total Evaluations of a rule's condition that errored, by rule.",
              "# TYPE vetd_rule_errors_total counter"]
    lines += [f'vetd_rule_errors_total{{rule="{_label_value(rule)}"}} {value}'
              for rule, value in sorted(per_rule.items())]
    states: dict[str, int] = {}
    online = 0
    for node in store.nodes.values():
        states[node.state] = states.get(node.state, 0) + 1
        online += node.online
    lines += ["# HELP vetd_nodes Nodes known to vetd, by state.", "# TYPE vetd_nodes gauge"]
    for state in ("healthy", "suspect", "excluded", "healing", "probation", "failed"):
        lines.append(f'vetd_nodes{{state="{state}"}} {states.get(state, 0)}')
    lines += ["# HELP vetd_nodes_online Nodes whose agent is connected.", "# TYPE vetd_nodes_online gauge",
              f"vetd_nodes_online {online}",
              "# HELP vetd_breaker_open 1 while the exclusion circuit breaker of a partition is open.",
              "# TYPE vetd_breaker_open gauge"]
    for row in store.breakers():
        lines.append(f'vetd_breaker_open{{partition="{row["partition"]}"}} {int(row["open"])}')
    return "\n".join(lines) + "\n"


def _label_value(text: str) -> str:
    """``text`` escaped for a Prometheus label value (rule names are free text)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class HttpApi:
    def __init__(self, store: Store, counters: Callable[[], dict[str, int]],
                 nodes: Callable[[], list[dict[str, Any]]], token: str, cluster: str) -> None:
        self.store, self.counters, self.nodes = store, counters, nodes
        self.token, self.cluster = token, cluster

    async def serve(self, host: str, port: int) -> None:
        try:
            server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:  # a taken port must not take the controller down with it
            log.error("http_unavailable", address=f"{host}:{port}", error=str(exc))
            return
        log.info("http_listening", address=f"{host}:{port}", state_changes="token" if self.token else "off")
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, kind = await asyncio.wait_for(self._request(reader), 10)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            status, body, kind = 400, b'{"error": "bad request"}', "application/json"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        request_line = (await reader.readline()).decode("latin-1").split()
        if len(request_line) != 3:
            raise ValueError("request line")
        method, path = request_line[0], request_line[1].split("?")[0]
        headers: dict[str, str] = {}
        while (line := (await reader.readline()).decode("latin-1").strip()):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            return self._json(413, {"error": "body too large"})
        body = await reader.readexactly(length) if length else b""
        if path == "/metrics" and method == "GET":
            text = metrics_text(self.store, self.counters())
            return 200, text.encode(), "text/plain; version=0.0.4"
        if path == "/api/v1/nodes" and method == "GET":
            return self._json(200, self.nodes())
        if path in ("/api/v1/drain", "/api/v1/resume"):
            if method != "POST":
                return self._json(405, {"error": "POST only"})
            return self._change(path.rsplit("/", 1)[1], headers.get("authorization", ""), body)
        return self._json(404, {"error": "not found"})

    def _change(self, action: str, authorization: str, body: bytes) -> tuple[int, bytes, str]:
        if not self.token:
            return self._json(403, {"error": "state changes over HTTP are off (set [http] token_file)"})
        given = authorization.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            log.warning("http_unauthorized", action=action)
            return self._json(401, {"error": "a valid bearer token is required"})
        try:
            data = json.loads(body or b"{}")
            names = [str(n) for n in NodeSet(str(data["nodes"]))]
            reason = str(data.get("reason", "")) if action == "drain" else ""
        except (ValueError, KeyError, TypeError, NodeSetException) as exc:
            return self._json(400, {"error": f"expected {{\"nodes\": HOSTLIST, \"reason\": TEXT}}: {exc}"})
        if action == "drain" and not reason:
            return self._json(400, {"error": "a drain needs a reason"})
        targets, problems = self.store.resolve_nodes(names, self.cluster)
        if problems:
            return self._json(400, {"error": "; ".join(problems)})
        request_id = self.store.submit("http", action, targets, reason)
        return self._json(202, {"request": request_id, "nodes": names})

    @staticmethod
    def _json(status: int, value: object) -> tuple[int, bytes, str]:
        return status, json.dumps(value).encode(), "application/json"
