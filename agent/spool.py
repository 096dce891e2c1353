"""What the agent has to send and the controller has not yet stored.

Results, events and replies go to an on-disk spool (SQLite, WAL) before they
are published. Results and events (sequence number > 0) leave it only when
the *controller* acknowledges them (:meth:`Spool.acknowledge`, from the ack
it publishes after committing them to its store); the broker's PUBACK only
marks them sent (:meth:`Spool.done`). Sent rows not acknowledged are sent
again, oldest first, after a reconnect or when the acks stop coming
(:meth:`Spool.rewind`, the transport decides when); the controller drops
the duplicates by (node, session, seq) and acknowledges them again. Replies
(sequence number 0: the controller does not store them) still leave on
PUBACK. So a broker outage, a broker that lost its store, a controller
killed with messages in memory, a network stall or the agent being killed
loses nothing. SQLite rather than an append-only file: deleting acknowledged
rows, dropping by priority and surviving a crash mid-write are what it
already does well, and it ships with Python.

Telemetry stays in memory (bounded; the oldest samples go first): it is
best effort by design. The spool is bounded too, sent-but-unacknowledged
rows included; when full it drops the oldest periodic results first, then
other non-critical messages, and never a critical event (a fatal XID).
Every drop is counted, persisted, and reported in the next birth message.

A spool that cannot be written (a full disk, an I/O error) does not stop the
agent: messages are held in memory, in order, up to ``memory_limit`` (the
same drop order applies there: never a critical event; they too stay until
acknowledged), the trouble is logged, counted and reported once as a
warning event, and every later put retries the database (at most once a
second) until it takes them again. A row acknowledged whose delete fails is
counted out and never sent again; its delete is retried. A spool file that
is not a database (or fails SQLite's quick check) is moved aside as
``<file>.corrupt-<unix time>`` and a new one started. The file is created
0600.

Durability: ``synchronous=NORMAL`` survives a crash of the agent (SIGKILL,
OOM); a power loss can cost the last moments of writes unless ``[agent]
spool_sync = "full"`` (one fsync per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from vetd.core import protocol
from vetd.core.files import create_private
from vetd.core.protocol import Event, Message, Result, Telemetry

log = structlog.get_logger("vetd.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    session TEXT NOT NULL DEFAULT '',
    seq INTEGER NOT NULL DEFAULT 0
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
    #: Where it waits: ``db`` (the spool file), ``held`` (memory, the file unwritable), ``telemetry``.
    where: str = "db"
    #: The agent session and sequence number the controller acknowledges it by; seq 0: PUBACK is enough.
    session: str = ""
    seq: int = 0


def priority_of(message: Message) -> int:
    if isinstance(message, Event) and message.severity == "critical":
        return PRIORITY_CRITICAL
    if isinstance(message, Result) and message.profile in ("", "periodic"):
        return PRIORITY_PERIODIC
    return PRIORITY_OTHER


#: Least time between two attempts to write to a spool file that failed.
RETRY_S = 1.0
#: What a spool write can raise on a full disk, an I/O error or a file gone bad.
WRITE_ERRORS = (sqlite3.Error, OSError)


class Spool:
    def __init__(self, path: Path | str | None, limit: int = 100_000, telemetry_limit: int = 1000,
                 sync: str = "normal", memory_limit: int = 10_000) -> None:
        self.limit = max(1, limit)
        self.memory_limit = max(1, memory_limit)
        self.path = str(path) if path else ":memory:"
        self.sync = sync
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open()
        self._count = int(self.db.execute("SELECT count(*) FROM spool").fetchone()[0])
        self._telemetry: deque[tuple[int, str, bytes]] = deque()
        self.telemetry_limit = max(1, telemetry_limit)
        self._telemetry_token = 0
        #: Messages the file would not take, oldest first: ``(token, kind, priority, topic, payload, session, seq)``.
        self._held: deque[tuple[int, str, int, str, bytes, str, int]] = deque()
        self._held_token = 0
        self._retry_at = 0.0
        #: Spool writes that failed since start (disk full, I/O error).
        self.write_failures = 0
        #: Called with ``(error)`` when writes start failing, once per episode (the agent emits an event).
        self.on_unwritable: Callable[[str], None] | None = None
        #: Rows and held messages up to these have been sent (PUBACK) in this pass; :meth:`rewind` resets them.
        self._sent_id = 0
        self._sent_token = 0
        #: Rows done with (acknowledged, or a reply PUBACKed) whose delete failed: counted out, never
        #: sent again, deleted when the file takes writes again.
        self._gone: set[int] = set()
        #: ``time.monotonic()`` of the last sign of progress: a first send, an ack that removed the oldest
        #: message waiting (acks of later ones are no progress: the oldest may have been lost), a rewind.
        self.progress_at = time.monotonic()
        #: Rows removed by the controller's acks since start.
        self.acknowledged = 0
        self._seen_memory: dict[str, float] = {}
        self._ready = asyncio.Event()
        self.dropped: Counter[str] = Counter(
            {r[0]: r[1] for r in self.db.execute("SELECT kind, count FROM dropped")}
        )
        if self._count:
            log.info("spool_recovered", messages=self._count, path=self.path)

    def _open(self) -> sqlite3.Connection:
        """Open the spool file; one that is not a sound database is moved aside and a new one made."""
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if self.path == ":memory:" or isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            aside = f"{self.path}.corrupt-{int(time.time())}"
            for suffix in ("", "-wal", "-shm"):
                if Path(self.path + suffix).exists():
                    Path(self.path + suffix).rename(aside + suffix)
            log.error("spool_corrupt_moved_aside", path=self.path, moved_to=aside, error=str(exc),
                      hint="its messages are lost; the file is kept for inspection")
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            create_private(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {problem}")
            db.executescript(SCHEMA)
            _upgrade(db)
        except BaseException:
            db.close()
            raise
        return db

    def __len__(self) -> int:
        return self._count + len(self._held) + len(self._telemetry)

    @property
    def held(self) -> int:
        """Messages waiting in memory because the spool file would not take them."""
        return len(self._held)

    def close(self) -> None:
        self.db.close()

    def put(self, message: Message) -> None:
        kind = protocol.channel_of(message)
        topic, payload = protocol.topic_for(message), protocol.encode(message)
        if len(payload) > protocol.MAX_PAYLOAD_BYTES:
            self._drop(f"oversize_{kind}")
            log.error("message_too_large", kind=kind, bytes=len(payload), limit=protocol.MAX_PAYLOAD_BYTES)
            return
        try:  # what the controller would refuse is dropped here, where it is made, and said so
            protocol.decode(payload)
        except protocol.ProtocolError as exc:
            self._drop(f"invalid_{kind}")
            log.error("message_out_of_bounds", kind=kind, error=str(exc)[:300])
            return
        if isinstance(message, Telemetry):
            if len(self._telemetry) >= self.telemetry_limit:
                self._telemetry.popleft()
                self._drop("telemetry")
            self._telemetry_token -= 1
            self._telemetry.append((self._telemetry_token, topic, payload))
        else:
            self._held_token += 1
            self._held.append((self._held_token, kind, priority_of(message), topic, payload, message.session,
                               message.seq))
            self.flush()
            if len(self._held) > self.memory_limit:
                self._make_room_held()
        self._ready.set()

    def flush(self) -> bool:
        """Move what is held in memory into the spool file, oldest first; False if it still fails."""
        if not self._held:
            return True
        if self._retry_at and time.monotonic() < self._retry_at:
            return False
        try:
            self._delete_gone()
            while self._held:
                _, kind, priority, topic, payload, session, seq = self._held[0]
                if self._count >= self.limit:
                    self._make_room()
                self.db.execute("INSERT INTO spool (kind, priority, topic, payload, session, seq) "
                                "VALUES (?,?,?,?,?,?)", (kind, priority, topic, payload, session, seq))
                self._held.popleft()
                self._count += 1
        except WRITE_ERRORS as exc:
            self._unwritable(exc)
            return False
        if self._retry_at:
            self._retry_at = 0.0
            log.warning("spool_writable_again", path=self.path, write_failures=self.write_failures)
        return True

    def _unwritable(self, exc: BaseException) -> None:
        self.write_failures += 1
        first = not self._retry_at
        self._retry_at = time.monotonic() + RETRY_S
        if first or self.write_failures % 1000 == 0:
            log.error("spool_write_failed", path=self.path, error=str(exc), held=len(self._held),
                      memory_limit=self.memory_limit, write_failures=self.write_failures)
        if first and self.on_unwritable is not None:
            self.on_unwritable(f"{type(exc).__name__}: {exc}")

    def _delete_gone(self) -> None:
        """Delete the rows already counted out whose delete failed before (raises if it fails again)."""
        if self._gone:
            gone = list(self._gone)
            for i in range(0, len(gone), 500):
                chunk = gone[i:i + 500]
                self.db.execute(f"DELETE FROM spool WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            self._gone.clear()

    def _make_room(self) -> None:
        row = self.db.execute(
            f"SELECT id, kind FROM spool WHERE priority < {PRIORITY_CRITICAL} ORDER BY priority, id LIMIT 1"
        ).fetchone()
        if row is None:
            return  # only critical events: keep them all, over the bound
        self.db.execute("DELETE FROM spool WHERE id=?", (row[0],))
        self._count -= 1
        self._drop(row[1])

    def _make_room_held(self) -> None:
        """Over the memory bound: the same order as the file's (periodic results first), never a critical event."""
        victims = [item for item in self._held if item[2] < PRIORITY_CRITICAL]
        if not victims:
            return
        victim = min(victims, key=lambda item: (item[2], item[0]))
        self._held.remove(victim)
        self._drop(victim[1])

    def _drop(self, kind: str) -> None:
        self.dropped[kind] += 1
        with contextlib.suppress(*WRITE_ERRORS):  # counted in memory, reported in the next birth all the same
            self.db.execute("INSERT INTO dropped (kind, count) VALUES (?, 1) "
                            "ON CONFLICT (kind) DO UPDATE SET count = count + 1", (kind,))
        if self.dropped[kind] in (1, 10, 100) or self.dropped[kind] % 1000 == 0:
            log.warning("spool_full_dropped", kind=kind, dropped=self.dropped[kind], limit=self.limit)

    def first_sight(self, command_id: str, expires: float) -> bool:
        """Record a command id; False if it was seen before (a replay). Kept until it expires,
        across agent restarts (in memory only while the spool file cannot be written)."""
        now = time.time()
        self._seen_memory = {k: v for k, v in self._seen_memory.items() if v >= now}
        if command_id in self._seen_memory:
            return False
        try:
            if self.db.execute("SELECT 1 FROM commands_seen WHERE id=?", (command_id,)).fetchone():
                return False
            self.db.execute("DELETE FROM commands_seen WHERE expires < ?", (now,))
            self.db.execute("INSERT INTO commands_seen (id, expires) VALUES (?, ?)", (command_id, expires))
        except WRITE_ERRORS as exc:
            self._unwritable(exc)
            self._seen_memory[command_id] = expires
        return True

    async def first(self, *, reliable: bool = True) -> Pending:
        """The oldest message not yet sent in this pass (spooled ones, then held ones, then
        telemetry); waits for one. ``reliable=False``: replies and telemetry only (what needs
        no controller ack), while results wait for a probe's ack."""
        while True:
            self.flush()
            row = self._next_row() if reliable else self.db.execute(
                "SELECT id, topic, payload, session, seq FROM spool WHERE seq = 0 ORDER BY id LIMIT 1").fetchone()
            if row is not None and row[0] in self._gone:
                row = None  # a reply whose delete failed: sent already, never again
            if row is not None:
                return Pending(row[0], row[1], bytes(row[2]), 1, "db", row[3], row[4])
            for token, _, _, topic, payload, session, seq in self._held:
                if (token > self._sent_token and reliable) or not seq:
                    return Pending(token, topic, payload, 1, "held", session, seq)
            if self._telemetry:
                token, topic, payload = self._telemetry[0]
                return Pending(token, topic, payload, 0, "telemetry")
            self._ready.clear()
            await self._ready.wait()

    def _next_row(self) -> tuple[int, str, bytes, str, int] | None:
        after = self._sent_id
        while True:
            row = self.db.execute("SELECT id, topic, payload, session, seq FROM spool WHERE id > ? "
                                  "ORDER BY id LIMIT 1", (after,)).fetchone()
            if row is None or row[0] not in self._gone:
                return row  # type: ignore[no-any-return]
            after = row[0]

    def done(self, pending: Pending) -> None:
        """The broker has it (PUBACK). A reply leaves the spool; a result or event is marked sent
        and stays until the controller acknowledges it (:meth:`acknowledge`)."""
        if pending.where == "telemetry":
            if self._telemetry and self._telemetry[0][0] == pending.token:
                self._telemetry.popleft()
            return
        if not self.awaiting_ack():
            self.progress_at = time.monotonic()  # the ack timeout runs from the first unacknowledged send
        if pending.where == "held":
            if pending.seq:
                self._sent_token = max(self._sent_token, pending.token)
                return
            for item in self._held:
                if item[0] == pending.token:
                    self._held.remove(item)
                    break
            return
        if pending.seq:
            self._sent_id = max(self._sent_id, pending.token)
        else:
            self._forget([pending.token])

    def _forget(self, ids: list[int]) -> None:
        """Delete rows that are done with; one whose delete fails is counted out all the same."""
        pending = [i for i in ids if i not in self._gone]
        try:
            while pending:
                chunk = pending[:500]
                self._count -= self.db.execute(
                    f"DELETE FROM spool WHERE id IN ({','.join('?' * len(chunk))})", chunk).rowcount
                pending = pending[500:]
        except WRITE_ERRORS as exc:  # done, but its row stays: skipped by first() until it can go
            self._unwritable(exc)
            self._gone.update(pending)
            self._count -= len(pending)

    def acknowledge(self, session: str, first: int, last: int) -> int:
        """The controller has stored ``session``'s messages ``first..last``: they leave the spool.
        Returns how many were still here (an ack for what is gone already removes nothing)."""
        removed = 0
        head = self._oldest()
        before = len(self._held)
        self._held = deque(item for item in self._held if not (item[5] == session and first <= item[6] <= last))
        removed += before - len(self._held)
        ids = [r[0] for r in self.db.execute("SELECT id FROM spool WHERE session=? AND seq BETWEEN ? AND ?",
                                              (session, first, last))]
        count = self._count
        self._forget(ids)
        removed += count - self._count
        if removed:
            self.acknowledged += removed
            if self._oldest() != head:
                self.progress_at = time.monotonic()
        return removed

    def _oldest(self) -> tuple[str, int] | None:
        """The oldest result or event here (spooled rows are older than held ones)."""
        after = 0
        while True:
            row = self.db.execute("SELECT id FROM spool WHERE id > ? AND seq > 0 ORDER BY id LIMIT 1",
                                  (after,)).fetchone()
            if row is None:
                break
            if row[0] not in self._gone:
                return ("db", int(row[0]))
            after = row[0]
        return next((("held", item[0]) for item in self._held if item[6]), None)

    def awaiting_ack(self) -> bool:
        """Whether something sent in this pass still waits for the controller's ack."""
        if self._sent_token and any(item[0] <= self._sent_token for item in self._held):
            return True
        if not self._sent_id:
            return False
        rows = self.db.execute("SELECT id FROM spool WHERE id <= ? ORDER BY id", (self._sent_id,))
        return any(row[0] not in self._gone for row in rows)

    def rewind(self) -> None:
        """Send again, oldest first, everything not yet acknowledged (after a reconnect, or when
        acks stopped coming: the controller may have lost it, or its ack was lost)."""
        self._sent_id = 0
        self._sent_token = 0
        self.progress_at = time.monotonic()
        self._ready.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until nothing waits (every result acknowledged by the controller), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not len(self)


def _upgrade(db: sqlite3.Connection) -> None:
    """A spool file from before controller acks: add ``session``/``seq``, filled from the payloads."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(spool)")}
    if "seq" not in columns:
        db.execute("ALTER TABLE spool ADD COLUMN session TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE spool ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
        for row_id, payload in db.execute("SELECT id, payload FROM spool").fetchall():
            with contextlib.suppress(protocol.ProtocolError):
                message = protocol.decode(payload)
                db.execute("UPDATE spool SET session=?, seq=? WHERE id=?", (message.session, message.seq, row_id))
    db.execute("CREATE INDEX IF NOT EXISTS spool_session_seq ON spool (session, seq)")
