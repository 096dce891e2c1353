"""What the agent has to send and the broker has not yet acknowledged.

Results, events and replies go to an on-disk spool (SQLite, WAL) before they
are published, and leave it only when the broker acknowledges them (QoS 1
PUBACK): a broker outage, a network stall or the agent being killed loses
nothing, and on reconnect the spool is sent oldest first. SQLite rather than
an append-only file: deleting acknowledged rows, dropping by priority and
surviving a crash mid-write are what it already does well, and it ships with
Python.

Telemetry stays in memory (bounded; the oldest samples go first): it is
best effort by design. The spool is bounded too; when full it drops the
oldest periodic results first, then other non-critical messages, and never
a critical event (a fatal XID). Every drop is counted, persisted, and
reported in the next birth message.

Durability: ``synchronous=NORMAL`` survives a crash of the agent (SIGKILL,
OOM); a power loss can cost the last moments of writes unless ``[agent]
spool_sync = "full"`` (one fsync per message).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import structlog

from vetd.core import protocol
from vetd.core.protocol import Event, Message, Result, Telemetry

log = structlog.get_logger("vetd.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS commands_seen (
    id TEXT PRIMARY KEY,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    kind TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""

#: Drop order when full: lower goes first. Critical events are never dropped.
PRIORITY_PERIODIC = 0
PRIORITY_OTHER = 1
PRIORITY_CRITICAL = 2


@dataclass(frozen=True)
class Pending:
    """One message to publish; ``token`` identifies it to :meth:`Spool.done`."""

    token: int
    topic: str
    payload: bytes
    qos: int


def priority_of(message: Message) -> int:
    if isinstance(message, Event) and message.severity == "critical":
        return PRIORITY_CRITICAL
    if isinstance(message, Result) and message.profile in ("", "periodic"):
        return PRIORITY_PERIODIC
    return PRIORITY_OTHER


class Spool:
    def __init__(self, path: Path | str | None, limit: int = 100_000, telemetry_limit: int = 1000,
                 sync: str = "normal") -> None:
        self.limit = max(1, limit)
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        self.db.executescript(SCHEMA)
        self._count = int(self.db.execute("SELECT count(*) FROM spool").fetchone()[0])
        self._telemetry: deque[tuple[int, str, bytes]] = deque()
        self.telemetry_limit = max(1, telemetry_limit)
        self._telemetry_token = 0
        self._ready = asyncio.Event()
        self.dropped: Counter[str] = Counter(
            {r[0]: r[1] for r in self.db.execute("SELECT kind, count FROM dropped")}
        )
        if self._count:
            log.info("spool_recovered", messages=self._count, path=self.path)

    def __len__(self) -> int:
        return self._count + len(self._telemetry)

    def close(self) -> None:
        self.db.close()

    def put(self, message: Message) -> None:
        topic, payload = protocol.topic_for(message), protocol.encode(message)
        if len(payload) > protocol.MAX_PAYLOAD_BYTES:
            self._drop(f"oversize_{protocol.channel_of(message)}")
            log.error("message_too_large", kind=protocol.channel_of(message), bytes=len(payload),
                      limit=protocol.MAX_PAYLOAD_BYTES)
            return
        if isinstance(message, Telemetry):
            if len(self._telemetry) >= self.telemetry_limit:
                self._telemetry.popleft()
                self._drop("telemetry")
            self._telemetry_token -= 1  # negative tokens: in memory
            self._telemetry.append((self._telemetry_token, topic, payload))
        else:
            if self._count >= self.limit:
                self._make_room()
            self.db.execute("INSERT INTO spool (kind, priority, topic, payload) VALUES (?,?,?,?)",
                            (protocol.channel_of(message), priority_of(message), topic, payload))
            self._count += 1
        self._ready.set()

    def _make_room(self) -> None:
        row = self.db.execute(
            f"SELECT id, kind FROM spool WHERE priority < {PRIORITY_CRITICAL} ORDER BY priority, id LIMIT 1"
        ).fetchone()
        if row is None:
            return  # only critical events: keep them all, over the bound
        self.db.execute("DELETE FROM spool WHERE id=?", (row[0],))
        self._count -= 1
        self._drop(row[1])

    def _drop(self, kind: str) -> None:
        self.dropped[kind] += 1
        self.db.execute("INSERT INTO dropped (kind, count) VALUES (?, 1) "
                        "ON CONFLICT (kind) DO UPDATE SET count = count + 1", (kind,))
        if self.dropped[kind] in (1, 10, 100) or self.dropped[kind] % 1000 == 0:
            log.warning("spool_full_dropped", kind=kind, dropped=self.dropped[kind], limit=self.limit)

    def first_sight(self, command_id: str, expires: float) -> bool:
        """Record a command id; False if it was seen before (a replay). Kept until it expires,
        across agent restarts."""
        now = time.time()
        self.db.execute("DELETE FROM commands_seen WHERE expires < ?", (now,))
        inserted = self.db.execute("INSERT OR IGNORE INTO commands_seen (id, expires) VALUES (?, ?)",
                                   (command_id, expires)).rowcount
        return inserted == 1

    async def first(self) -> Pending:
        """The oldest message waiting (spooled ones before telemetry); waits for one."""
        while True:
            row = self.db.execute("SELECT id, topic, payload FROM spool ORDER BY id LIMIT 1").fetchone()
            if row is not None:
                return Pending(row[0], row[1], bytes(row[2]), 1)
            if self._telemetry:
                token, topic, payload = self._telemetry[0]
                return Pending(token, topic, payload, 0)
            self._ready.clear()
            await self._ready.wait()

    def done(self, pending: Pending) -> None:
        """The broker has it: forget it."""
        if pending.token < 0:
            if self._telemetry and self._telemetry[0][0] == pending.token:
                self._telemetry.popleft()
            return
        deleted = self.db.execute("DELETE FROM spool WHERE id=?", (pending.token,)).rowcount
        self._count -= deleted

    async def drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not len(self)
