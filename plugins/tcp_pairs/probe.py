"""The TCP stream probe: ``streams`` connections sending for ``seconds``, counted by the receiver.

As iperf3 measures: the sender writes ``write_kib`` blocks as fast as the
network takes them over several parallel connections; the receiver counts
the bytes and notes when the first and the last arrived. The figure is the
receiver's: every stream's bytes over the span from the first byte of any
stream to the last byte of any (one clock, the receiver's), in decimal GB/s.

Wire format of one stream: ``MAGIC`` (8 bytes), then data until the sender
shuts its side down; the receiver then answers ``!QQQ``: bytes received,
first and last arrival (its monotonic clock, ns). Anything else on the port is
dropped without an answer.

Threads, not the event loop: each stream is one blocking socket in a thread
of its own (``recv_into``/``sendall`` release the GIL), so Python moves the
data at the rate of the kernel's copies.
"""

from __future__ import annotations

import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

from vetd.agent.api import PairSample, PairServer, Peer
from vetd.plugins.tcp_pairs.config import TcpPairsConfig

MAGIC = b"vetdTCP1"
ANSWER = struct.Struct("!QQQ")
#: Connections served at once (a scan or a stuck peer cannot take every thread).
MAX_CONNECTIONS = 256
#: A stream that sends nothing for this long is given up by the receiver.
IDLE_S = 30.0


class TcpEndpoint(PairServer):
    """Listens for peers' streams (:class:`~vetd.agent.api.PairServer`) and measures ours to them."""

    name = "tcp_pairs"

    def __init__(self, config: TcpPairsConfig) -> None:
        self.config = config
        super().__init__(config.port, max_connections=MAX_CONNECTIONS)

    # -- receiving -------------------------------------------------------------------

    def serve_peer(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_S)
        header = b""
        while len(header) < len(MAGIC):
            chunk = conn.recv(len(MAGIC) - len(header))
            if not chunk:
                return
            header += chunk
        if header != MAGIC:
            return
        buffer = bytearray(max(self.config.write_kib, 256) << 10)
        view = memoryview(buffer)
        received, first, last = 0, 0, 0
        while True:
            n = conn.recv_into(view)
            if n == 0:
                break
            now = time.monotonic_ns()
            if not received:
                first = now
            received += n
            last = now
        conn.sendall(ANSWER.pack(received, first, last))

    # -- sending ---------------------------------------------------------------------

    def measure(self, peer: Peer, seconds: float, lead: bool, key: str) -> PairSample:
        port = int(peer.info.get("port", 0))
        if not port:
            return PairSample(gbps=None, error=f"{peer.node} announced no probe port")
        streams = self.config.streams
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="vetd[tcp_pairs].send") as pool:
            futures = [pool.submit(self._send, peer.host, port, start + seconds + float(self.config.connect_timeout),
                                   seconds) for _ in range(streams)]
            answers = [f.result() for f in futures]
        errors = [a for a in answers if isinstance(a, str)]
        if errors:
            return PairSample(gbps=None, error=f"to {peer.node}: {errors[0]}",
                              detail={"streams": float(streams), "streams_failed": float(len(errors))})
        counts = [a for a in answers if not isinstance(a, str)]
        total = sum(c[0] for c in counts)
        span_ns = max(c[2] for c in counts) - min(c[1] for c in counts if c[0])
        if total == 0 or span_ns <= 0:
            return PairSample(gbps=None, error=f"{peer.node} received nothing",
                              detail={"streams": float(streams)})
        span = span_ns / 1e9
        return PairSample(gbps=total / span / 1e9,
                          detail={"streams": float(streams), "bytes": float(total), "seconds": round(span, 4)})

    def _send(self, host: str, port: int, give_up: float, seconds: float) -> tuple[int, int, int] | str:
        """One stream: connect, send for ``seconds``, read the receiver's count; a string says what failed."""
        timeout = float(self.config.connect_timeout)
        try:
            with socket.create_connection((host, port), timeout=timeout) as conn:
                conn.settimeout(max(timeout, seconds))
                conn.sendall(MAGIC)
                block = memoryview(bytes(self.config.write_kib << 10))
                stop = time.monotonic() + seconds
                while time.monotonic() < stop:
                    conn.sendall(block)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(max(1.0, give_up - time.monotonic() + timeout))
                answer = b""
                while len(answer) < ANSWER.size:
                    chunk = conn.recv(ANSWER.size - len(answer))
                    if not chunk:
                        return "the receiver closed without a count"
                    answer += chunk
                received, first, last = ANSWER.unpack(answer)
                return int(received), int(first), int(last)
        except TimeoutError:
            return f"timed out ({host}:{port})"
        except OSError as exc:
            return f"{exc.strerror or exc} ({host}:{port})"
