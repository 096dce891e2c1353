"""Pair tests: bandwidth from one node to another, run in the pair rounds of ``vetd vet``.

A plugin adds :class:`PairTest` objects in ``vetd_register_pair_tests``
(``tcp_pairs``: a TCP stream probe; ``nccl_pairs``: NCCL between the nodes'
GPUs). The rounds, the rendezvous and the localisation are vetd's
(:mod:`vetd.agent.fabric`, :mod:`vetd.core.pairs`) and the same for every
test; a test only measures.

Every node of a run opens one :class:`PairEndpoint` (``PairTest.open``): it
starts whatever serves the peers (a listening socket) and says, in
``announce()``, what a peer needs to reach it. In each round both nodes of a
pair call ``measure`` at the same time, each for its own direction: what it
sends to the peer, as the peer received it. The methods block; vetd calls them
in threads, under deadlines (``seconds + overhead_s``).

An endpoint whose peers connect to it (the TCP probe's streams, NCCL's unique id
hand-over) is a :class:`PairServer`: the listening socket, its accept thread,
``announce()`` of its port and ``close()`` are the same for every test, and
the test only says how to serve one peer's connection (``serve_peer``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from vetd.agent.checks import _Registry


class PairSample(msgspec.Struct, kw_only=True, frozen=True):
    """One direction measured: decimal GB/s (None: it failed, ``error`` says why)."""

    gbps: float | None
    error: str = ""
    #: Anything else measured, with units in the names (``streams``, ``bytes``, ``seconds``).
    detail: dict[str, float] = {}


@dataclass(frozen=True)
class Peer:
    """The other node of a pair."""

    node: str
    #: What to connect to: the node name, resolved by the system resolver.
    host: str
    #: What the peer's endpoint announced (its port…).
    info: Mapping[str, Any] = field(default_factory=dict)


class PairEndpoint(Protocol):
    """One node's side of a pair test for a whole run."""

    def announce(self) -> dict[str, Any]:
        """What peers need to reach this endpoint (JSON-able), sent to them through the rendezvous."""
        ...

    def measure(self, peer: Peer, seconds: float, lead: bool, key: str) -> PairSample:
        """Send to ``peer`` for ``seconds``; ``lead`` is true on one side of each pair (the lower rank),
        ``key`` names the pair and round the same on both sides. Must not raise for a network fault:
        a sample without ``gbps`` says what failed."""
        ...

    def close(self) -> None:
        """Stop serving; called once, at the end of the run."""
        ...


def _available() -> str:
    return ""


@dataclass(frozen=True)
class PairTest:
    """A bandwidth test between two nodes."""

    name: str
    #: Open this node's endpoint for a run (blocking: binds, may start threads or processes).
    open: Callable[[], PairEndpoint]
    #: Why the test cannot run on this node (``""``: it can), e.g. no GPU for NCCL.
    unavailable: Callable[[], str] = _available
    #: How long one direction is measured, in seconds (from the plugin's config).
    seconds: float = 3.0
    #: Fixed cost of one measurement on top of ``seconds`` (connects, a CUDA context);
    #: a round's deadline is ``seconds + overhead_s``.
    overhead_s: float = 10.0
    #: Preferred by ``--test auto`` when every node can run it (NCCL over TCP).
    priority: int = 0
    description: str = ""
    plugin: str = ""


class PairTestRegistry(_Registry[PairTest]):
    """Where plugins add their pair tests (``registry.add(PairTest(...))``)."""


class PairServer:
    """The listening side of a :class:`PairEndpoint`: a socket on every address (IPv6 and IPv4) on
    ``port`` (0: any free one), whose connections are each served by :meth:`serve_peer` in a thread
    of their own, at most ``max_connections`` at once (one more is closed as soon as it is accepted:
    a scan or a stuck peer cannot take every thread). ``announce()`` gives peers the port.

    A pair test subclasses it, implements :meth:`serve_peer` and ``measure``.
    """

    #: The thread names' tag: ``vetd[NAME].accept``, ``vetd[NAME].serve``.
    name = "pair_test"

    def __init__(self, port: int = 0, max_connections: int = 256, backlog: int = 128) -> None:
        if socket.has_dualstack_ipv6():
            self._server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                                backlog=backlog)
        else:
            self._server = socket.create_server(("", port), backlog=backlog)
        self.port = int(self._server.getsockname()[1])
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"vetd[{self.name}].accept", daemon=True)
        self._thread.start()

    def serve_peer(self, conn: socket.socket) -> None:
        """Serve one peer's connection (closed when this returns; an ``OSError`` ends it quietly)."""
        raise NotImplementedError

    def announce(self) -> dict[str, Any]:
        return {"port": self.port}

    def close(self) -> None:
        """Stop accepting (connections being served finish on their own, within their timeouts)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name=f"vetd[{self.name}].serve", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.serve_peer(conn)
        except OSError:
            pass
        finally:
            self._slots.release()
