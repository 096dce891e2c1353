"""Fleet state in SQLite (WAL): nodes, sessions, latest and historical results, audit.

One writer (the controller process); any number of readers (``vetd nodes`` and
friends open the same file read-only while the controller runs). Ingest is
idempotent: ``(cluster, node, session, seq)`` is unique, so a message delivered
twice is counted as a duplicate and changes nothing.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from vetd.core.files import create_private
from vetd.core.protocol import Event, Result, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    cluster TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'healthy',
    state_since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    online INTEGER NOT NULL DEFAULT 0,
    session TEXT NOT NULL DEFAULT '',
    session_started REAL NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    agent_version TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (cluster, name)
);
CREATE TABLE IF NOT EXISTS sessions (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    session TEXT NOT NULL,
    first_seen REAL NOT NULL,
    max_seq INTEGER NOT NULL DEFAULT 0,
    received INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, node, session)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    entity TEXT NOT NULL,
    status TEXT NOT NULL,
    codes TEXT NOT NULL,
    metrics TEXT NOT NULL,
    message TEXT NOT NULL,
    UNIQUE (cluster, node, session, seq)
);
CREATE INDEX IF NOT EXISTS history_node_ts ON history (cluster, node, ts);
CREATE TABLE IF NOT EXISTS latest (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    check_name TEXT NOT NULL,
    entity TEXT NOT NULL,
    status TEXT NOT NULL,
    codes TEXT NOT NULL,
    metrics TEXT NOT NULL,
    message TEXT NOT NULL,
    ts REAL NOT NULL,
    history_id INTEGER,
    PRIMARY KEY (cluster, node, check_name, entity)
);
CREATE TABLE IF NOT EXISTS rule_state (
    rule TEXT NOT NULL,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    subject TEXT NOT NULL,
    phase TEXT NOT NULL,
    since REAL NOT NULL,
    cleared_at REAL,
    PRIMARY KEY (rule, cluster, node, subject)
);
CREATE TABLE IF NOT EXISTS rule_window (
    rule TEXT NOT NULL,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    subject TEXT NOT NULL,
    stamps TEXT NOT NULL,
    PRIMARY KEY (rule, cluster, node, subject)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    rule TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    evidence TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS audit_node ON audit (cluster, node, ts);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    nodes TEXT NOT NULL DEFAULT '[]',
    reason TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'pending',
    result TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS breaker (
    partition TEXT PRIMARY KEY,
    open INTEGER NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS healing (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    rule TEXT NOT NULL,
    ladder TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL,
    command_id TEXT NOT NULL DEFAULT '',
    deadline REAL NOT NULL DEFAULT 0,
    gpu TEXT NOT NULL DEFAULT 'all',
    session TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    PRIMARY KEY (cluster, node)
);
CREATE TABLE IF NOT EXISTS alerts_firing (
    key TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    payload TEXT NOT NULL,
    last_sent REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    until REAL NOT NULL,
    author TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    matchers TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_loss (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    dropped TEXT NOT NULL,
    PRIMARY KEY (cluster, node)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


#: (rule, cluster, node, subject)
RuleKey = tuple[str, str, str, str]


@dataclass
class RuleState:
    """Where a rule stands for one subject: ``pending`` (waiting out ``for``),
    ``firing``, or firing with the condition cleared at ``cleared_at``
    (waiting out ``keep_firing_for``)."""

    phase: str
    since: float
    cleared_at: float | None = None


@dataclass
class Healing:
    """One node's way back: the ladder, where it stands, what it waits for.

    ``phase``: ``next`` (start step ``step``), ``step`` (its command is out),
    ``rebooting`` (waiting for a new agent session), ``probation`` (re-vetting).
    """

    cluster: str
    node: str
    rule: str
    ladder: list[str]
    step: int
    phase: str
    started: float
    command_id: str = ""
    deadline: float = 0.0
    gpu: str = "all"
    session: str = ""


@dataclass
class NodeRow:
    cluster: str
    name: str
    state: str = "healthy"
    state_since: float = 0.0
    reason: str = ""
    online: bool = False
    session: str = ""
    session_started: float = 0.0
    first_seen: float = 0.0
    last_seen: float = 0.0
    agent_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)


class Store:
    """The controller's database."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no vetd state database at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                create_private(self.path)  # 0600 before SQLite makes it (and its -wal, -shm) 0644
            self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row
        self.nodes: dict[tuple[str, str], NodeRow] = {} if readonly else self._load_nodes()
        #: Written once per batch by :meth:`flush` rather than once per message.
        self._dirty: set[tuple[str, str]] = set()
        self._sessions: dict[tuple[str, str, str], list[float]] = {}

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; per-batch bookkeeping is flushed before it commits."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.flush()
        except BaseException:
            self.db.execute("ROLLBACK")
            self._dirty.clear()
            self._sessions.clear()
            raise
        self.db.execute("COMMIT")

    def flush(self) -> None:
        """Write the node rows and session counters this batch touched."""
        for key in self._dirty:
            self.save_node(self.nodes[key])
        self._dirty.clear()
        self.db.executemany(
            """INSERT INTO sessions (cluster, node, session, first_seen, max_seq, received, duplicates)
               VALUES (?,?,?,?,?,?,?)
               ON CONFLICT (cluster, node, session) DO UPDATE SET
                   max_seq=max(max_seq, excluded.max_seq),
                   received=received + excluded.received,
                   duplicates=duplicates + excluded.duplicates""",
            [(*key, first, int(max_seq), int(received), int(dups))
             for key, (first, max_seq, received, dups) in self._sessions.items()],
        )
        self._sessions.clear()

    # -- nodes -------------------------------------------------------------

    def _load_nodes(self) -> dict[tuple[str, str], NodeRow]:
        rows = self.db.execute("SELECT * FROM nodes").fetchall()
        return {(r["cluster"], r["name"]): _node_from_row(r) for r in rows}

    def node(self, cluster: str, name: str, now: float) -> NodeRow:
        """The node's row, created (healthy, offline) on first sight."""
        key = (cluster, name)
        row = self.nodes.get(key)
        if row is None:
            row = NodeRow(cluster, name, state_since=now, first_seen=now, last_seen=now)
            self.nodes[key] = row
            self.save_node(row)
        return row

    def save_node(self, row: NodeRow) -> None:
        self.db.execute(
            """INSERT INTO nodes (cluster, name, state, state_since, reason, online, session,
                   session_started, first_seen, last_seen, agent_version, labels)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (cluster, name) DO UPDATE SET state=excluded.state,
                   state_since=excluded.state_since, reason=excluded.reason,
                   online=excluded.online, session=excluded.session,
                   session_started=excluded.session_started, last_seen=excluded.last_seen,
                   agent_version=excluded.agent_version, labels=excluded.labels""",
            (row.cluster, row.name, row.state, row.state_since, row.reason, int(row.online),
             row.session, row.session_started, row.first_seen, row.last_seen, row.agent_version,
             _json(row.labels)),
        )

    def apply_state(self, message: State, now: float) -> bool:
        """Apply a birth or death; returns False for a stale death that was ignored."""
        row = self.node(message.cluster, message.node, now)
        if message.online:
            if message.session != row.session and message.started < row.session_started:
                return False  # a retained birth older than the session we know
            row.online = True
            row.session = message.session
            row.session_started = message.started
            row.agent_version = message.agent_version
            row.labels = dict(message.labels)
        else:
            if message.session != row.session and message.started <= row.session_started:
                return False  # death of an older session: never overrides a newer birth
            row.online = False
            row.session = message.session
            row.session_started = max(row.session_started, message.started)
        row.last_seen = max(row.last_seen, now)
        self.save_node(row)
        return True

    # -- results and events ------------------------------------------------

    def record(self, message: Result | Event, now: float) -> int | None:
        """Store a result or event; the history id, or None for a duplicate."""
        status: str
        if isinstance(message, Result):
            kind, name, status = "result", message.check, message.status
        else:
            kind, name, status = "event", message.name, message.severity
        codes = _json(message.codes)
        metrics = _json(_finite(message.metrics))
        cursor = self.db.execute(
            """INSERT OR IGNORE INTO history (cluster, node, session, seq, ts, received_at, kind,
                   name, entity, status, codes, metrics, message)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
            (message.cluster, message.node, message.session, message.seq, message.ts, now, kind,
             name, message.entity, status, codes, metrics, message.message),
        )
        duplicate = cursor.rowcount == 0
        tally = self._sessions.setdefault((message.cluster, message.node, message.session), [now, 0, 0, 0])
        tally[1] = max(tally[1], message.seq)
        tally[3 if duplicate else 2] += 1
        row = self.node(message.cluster, message.node, now)
        row.last_seen = max(row.last_seen, now)
        if not row.session:
            row.session = message.session
        if message.session == row.session:
            row.online = True
        self._dirty.add((row.cluster, row.name))
        if duplicate:
            return None
        history_id = cursor.lastrowid
        if isinstance(message, Result):
            self.db.execute(
                """INSERT INTO latest (cluster, node, check_name, entity, status, codes, metrics,
                       message, ts, history_id) VALUES (?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT (cluster, node, check_name, entity) DO UPDATE SET
                       status=excluded.status, codes=excluded.codes, metrics=excluded.metrics,
                       message=excluded.message, ts=excluded.ts, history_id=excluded.history_id
                   WHERE excluded.ts >= latest.ts""",
                (message.cluster, message.node, message.check, message.entity, message.status,
                 codes, metrics, message.message, message.ts, history_id),
            )
        return history_id

    # -- rule state (pending / firing / keeping) and count windows -----------

    def rule_states(self) -> dict[RuleKey, RuleState]:
        rows = self.db.execute("SELECT * FROM rule_state").fetchall()
        return {(r["rule"], r["cluster"], r["node"], r["subject"]): RuleState(r["phase"], r["since"], r["cleared_at"])
                for r in rows}

    def save_rule_state(self, key: RuleKey, state: RuleState | None) -> None:
        if state is None:
            self.db.execute("DELETE FROM rule_state WHERE rule=? AND cluster=? AND node=? AND subject=?", key)
        else:
            self.db.execute(
                "INSERT OR REPLACE INTO rule_state (rule, cluster, node, subject, phase, since, cleared_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (*key, state.phase, state.since, state.cleared_at),
            )

    def rule_windows(self) -> dict[RuleKey, list[float]]:
        rows = self.db.execute("SELECT * FROM rule_window").fetchall()
        return {(r["rule"], r["cluster"], r["node"], r["subject"]): json.loads(r["stamps"]) for r in rows}

    def save_rule_window(self, key: RuleKey, stamps: Sequence[float]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rule_window (rule, cluster, node, subject, stamps) VALUES (?,?,?,?,?)",
            (*key, json.dumps(list(stamps))),
        )

    # -- audit and counters ------------------------------------------------

    def audit(
        self,
        cluster: str,
        node: str,
        action: str,
        *,
        actor: str = "controller",
        rule: str = "",
        outcome: str = "",
        detail: str = "",
        evidence: Sequence[int] = (),
        now: float | None = None,
    ) -> int:
        cursor = self.db.execute(
            """INSERT INTO audit (ts, cluster, node, actor, action, rule, outcome, detail, evidence)
               VALUES (?,?,?,?,?,?,?,?,?)""",
            (time.time() if now is None else now, cluster, node, actor, action, rule, outcome,
             detail, json.dumps(list(evidence))),
        )
        return int(cursor.lastrowid or 0)

    def record_outcome(self, audit_id: int, outcome: str, detail: str, *, append: bool = False) -> None:
        """Set how a decided action turned out; ``append`` adds ``detail`` to the decision's own."""
        self.db.execute("UPDATE audit SET outcome=?, detail=" + ("detail || ?" if append else "?") + " WHERE id=?",
                        (outcome, detail, audit_id))

    def pending_drains(self) -> list[dict[str, Any]]:
        """Drains decided but not carried out (the controller died in between)."""
        rows = self.db.execute(
            "SELECT id, cluster, node, rule, detail FROM audit WHERE action='drain' AND outcome='pending'"
        ).fetchall()
        return [dict(r) for r in rows]

    def audit_after(self, audit_id: int) -> list[dict[str, Any]]:
        """Audit rows written after ``audit_id``, oldest first."""
        return [dict(r) for r in self.db.execute("SELECT * FROM audit WHERE id > ? ORDER BY id", (audit_id,))]

    def add_counters(self, counts: Mapping[str, int]) -> None:
        self.db.executemany(
            """INSERT INTO counters (name, value) VALUES (?, ?)
               ON CONFLICT (name) DO UPDATE SET value = value + excluded.value""",
            [(name, value) for name, value in counts.items() if value],
        )

    # -- healing ladders ----------------------------------------------------

    def healings(self) -> list[Healing]:
        rows = self.db.execute("SELECT * FROM healing ORDER BY started").fetchall()
        return [Healing(**{**dict(r), "ladder": json.loads(r["ladder"])}) for r in rows]

    def save_healing(self, healing: Healing) -> None:
        self.db.execute(
            """INSERT OR REPLACE INTO healing (cluster, node, rule, ladder, step, phase, command_id, deadline,
                   gpu, session, started) VALUES (?,?,?,?,?,?,?,?,?,?,?)""",
            (healing.cluster, healing.node, healing.rule, json.dumps(healing.ladder), healing.step,
             healing.phase, healing.command_id, healing.deadline, healing.gpu, healing.session, healing.started),
        )

    def end_healing(self, cluster: str, node: str) -> None:
        self.db.execute("DELETE FROM healing WHERE cluster=? AND node=?", (cluster, node))

    # -- alerts: firing ones (re-sent until resolved) and silences ----------------

    def firing_alerts(self) -> dict[str, dict[str, Any]]:
        rows = self.db.execute("SELECT key, payload FROM alerts_firing").fetchall()
        return {r["key"]: json.loads(r["payload"]) for r in rows}

    def save_firing_alert(self, key: str, cluster: str, node: str, payload: dict[str, Any] | None,
                          now: float) -> None:
        if payload is None:
            self.db.execute("DELETE FROM alerts_firing WHERE key=?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO alerts_firing (key, cluster, node, payload, last_sent) "
                            "VALUES (?,?,?,?,?)", (key, cluster, node, json.dumps(payload), now))

    def add_silence(self, matchers: Sequence[str], until: float, author: str, comment: str) -> int:
        cursor = self.db.execute(
            "INSERT INTO silences (created, until, author, comment, matchers) VALUES (?,?,?,?,?)",
            (time.time(), until, author, comment, json.dumps(list(matchers))),
        )
        return int(cursor.lastrowid or 0)

    def silences(self, now: float | None = None) -> list[dict[str, Any]]:
        """Active silences (all of them with ``now`` None)."""
        query = "SELECT * FROM silences" + ("" if now is None else " WHERE until > ?") + " ORDER BY id"
        rows = self.db.execute(query, () if now is None else (now,)).fetchall()
        return [{**dict(r), "matchers": json.loads(r["matchers"])} for r in rows]

    def expire_silence(self, silence_id: int) -> bool:
        cursor = self.db.execute("UPDATE silences SET until=? WHERE id=? AND until > ?",
                                 (time.time(), silence_id, time.time()))
        return cursor.rowcount > 0

    # -- operator requests and the circuit breaker ---------------------------

    def submit(self, actor: str, action: str, nodes: Sequence[object] = (), reason: str = "") -> int:
        """Queue an operator request for the running controller.

        ``nodes`` are ``(cluster, node)`` pairs, or partition names for a breaker reset.
        """
        cursor = self.db.execute(
            "INSERT INTO requests (ts, actor, action, nodes, reason) VALUES (?,?,?,?,?)",
            (time.time(), actor, action, json.dumps(list(nodes)), reason),
        )
        return int(cursor.lastrowid or 0)

    def request(self, request_id: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM requests WHERE id=?", (request_id,)).fetchone()
        return None if row is None else {**dict(row), "nodes": json.loads(row["nodes"])}

    def pending_requests(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM requests WHERE status='pending' ORDER BY id").fetchall()
        return [{**dict(r), "nodes": json.loads(r["nodes"])} for r in rows]

    def finish_request(self, request_id: int, status: str, result: Any) -> None:
        self.db.execute("UPDATE requests SET status=?, result=? WHERE id=?",
                        (status, json.dumps(result), request_id))

    def resolve_nodes(self, names: Sequence[str], cluster: str) -> tuple[list[tuple[str, str]], list[str]]:
        """``(cluster, node)`` for each name, and what stops that: a node vetd has
        not seen, or one known in several clusters, when ``cluster`` is not given."""
        known: dict[str, list[str]] = {}
        for row in self.node_rows():
            known.setdefault(row.name, []).append(row.cluster)
        targets, problems = [], []
        for name in names:
            clusters = [cluster] if cluster else known.get(name, [])
            if len(clusters) == 1:
                targets.append((clusters[0], name))
            else:
                problems.append(f"node {name} is "
                                + ("unknown to vetd" if not clusters else f"in several clusters ({', '.join(clusters)})"))
        return targets, problems

    def breaker_open(self, partition: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM breaker WHERE partition=? AND open=1", (partition,)).fetchone()
        return None if row is None else dict(row)

    def set_breaker(self, partition: str, open_: bool, reason: str = "", now: float | None = None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO breaker (partition, open, since, reason) VALUES (?,?,?,?)",
            (partition, int(open_), time.time() if now is None else now, reason),
        )

    def breakers(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM breaker ORDER BY partition")]

    def exclusions_since(self, cluster: str, node: str, since: float) -> int:
        """Times rules excluded this node since ``since`` (operator drains not counted)."""
        row = self.db.execute(
            """SELECT count(*) FROM audit WHERE action='drain' AND actor='controller' AND rule != ''
               AND outcome IN ('pending', 'done', 'skipped') AND cluster=? AND node=? AND ts>=?""",
            (cluster, node, since),
        ).fetchone()
        return int(row[0])

    def drains_since(self, since: float, partition_nodes: Sequence[tuple[str, str]]) -> int:
        if not partition_nodes:
            return 0
        marks = ",".join("(?,?)" for _ in partition_nodes)
        flat = [value for pair in partition_nodes for value in pair]
        row = self.db.execute(
            f"""SELECT count(*) FROM audit WHERE action='drain' AND actor='controller' AND ts>=?
                AND outcome IN ('pending', 'done') AND (cluster, node) IN (VALUES {marks})""",
            (since, *flat),
        ).fetchone()
        return int(row[0])

    # -- read side (CLI views) ---------------------------------------------

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self.db.execute("SELECT name, value FROM counters")}

    def node_rows(self) -> list[NodeRow]:
        rows = self.db.execute("SELECT * FROM nodes ORDER BY cluster, name").fetchall()
        return [_node_from_row(r) for r in rows]

    def latest(self, cluster: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM latest WHERE (? IS NULL OR cluster=?) AND (? IS NULL OR node=?)"
        rows = self.db.execute(query + " ORDER BY cluster, node, check_name, entity",
                               (cluster, cluster, node, node))
        return [_decoded(dict(r)) for r in rows]

    def history(self, cluster: str, node: str, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM history WHERE cluster=? AND node=? ORDER BY ts DESC, id DESC LIMIT ?",
            (cluster, node, limit),
        )
        return [_decoded(dict(r)) for r in rows]

    def audit_log(self, cluster: str | None = None, node: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.execute(
            """SELECT * FROM audit WHERE (? IS NULL OR cluster=?) AND (? IS NULL OR node=?)
               ORDER BY id DESC LIMIT ?""",
            (cluster, cluster, node, node, limit),
        )
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in rows]

    def first_history_ts(self, cluster: str, node: str, since: float) -> float | None:
        row = self.db.execute("SELECT min(ts) FROM history WHERE cluster=? AND node=? AND ts>=?",
                              (cluster, node, since)).fetchone()
        return None if row[0] is None else float(row[0])

    def history_since(self, since: float, node: str | None = None) -> Iterator[dict[str, Any]]:
        """Stored results and events from ``since`` on (of ``node`` only, if given), oldest first."""
        query = "SELECT * FROM history WHERE ts >= ? AND (? IS NULL OR node = ?) ORDER BY ts, id"
        for row in self.db.execute(query, (since, node, node)):
            yield _decoded(dict(row))

    def delivery(self, cluster: str, node: str) -> dict[str, Any]:
        """Received, duplicate and missing (sequence gaps) results+events of a node,
        and what the agent itself reported dropping (spool full)."""
        row = self.db.execute(
            """SELECT coalesce(sum(received), 0), coalesce(sum(duplicates), 0),
                      coalesce(sum(max(max_seq - received, 0)), 0)
               FROM sessions WHERE cluster=? AND node=?""",
            (cluster, node),
        ).fetchone()
        loss = self.db.execute("SELECT dropped FROM agent_loss WHERE cluster=? AND node=?",
                               (cluster, node)).fetchone()
        return {"received": row[0], "duplicates": row[1], "gaps": row[2],
                "agent_dropped": json.loads(loss[0]) if loss else {}}

    def set_agent_loss(self, cluster: str, node: str, dropped: Mapping[str, int]) -> None:
        self.db.execute("INSERT OR REPLACE INTO agent_loss (cluster, node, dropped) VALUES (?,?,?)",
                        (cluster, node, json.dumps(dict(dropped))))


_json_encoder = msgspec.json.Encoder()


def _json(value: object) -> str:
    return _json_encoder.encode(value).decode()


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("codes", "metrics"):
        if key in row:
            row[key] = json.loads(row[key])
    return row


def _node_from_row(r: sqlite3.Row) -> NodeRow:
    return NodeRow(
        cluster=r["cluster"],
        name=r["name"],
        state=r["state"],
        state_since=r["state_since"],
        reason=r["reason"],
        online=bool(r["online"]),
        session=r["session"],
        session_started=r["session_started"],
        first_seen=r["first_seen"],
        last_seen=r["last_seen"],
        agent_version=r["agent_version"],
        labels=json.loads(r["labels"]),
    )
