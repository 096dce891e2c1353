"""The spool on a real file: a full disk and a corrupt file do not stop the agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vetd.agent.spool import Spool
from vetd.core.protocol import Event, Result

BASE = {"cluster": "alps", "node": "nid001", "session": "s1", "ts": 1700000000.0}


def result(seq: int, profile: str = "periodic") -> Result:
    return Result(**BASE, seq=seq, check="c", status="pass", profile=profile, message="x" * 200)


def critical(seq: int) -> Event:
    return Event(**BASE, seq=seq, name="xid", severity="critical", codes=["xid_79"], message="x" * 2000)


def drain(spool: Spool) -> list[int]:
    """Publish everything waiting, as the transport does, each acknowledged by the controller at
    once; the sequence numbers in order."""
    from vetd.core import protocol

    seqs = []
    while len(spool):
        pending = asyncio.run(spool.first())
        seqs.append(protocol.decode(pending.payload).seq)
        spool.done(pending)
        spool.acknowledge(pending.session, pending.seq, pending.seq)
    return seqs


def fill_file(spool: Spool) -> None:
    """The spool file cannot grow any more: SQLite answers SQLITE_FULL, as on a full disk."""
    pages = spool.db.execute("PRAGMA page_count").fetchone()[0]
    spool.db.execute(f"PRAGMA max_page_count={pages}")


def test_a_full_spool_file_holds_messages_in_memory_and_writes_them_later(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", memory_limit=50)
    unwritable: list[str] = []
    spool.on_unwritable = unwritable.append
    spool.put(result(1))
    fill_file(spool)
    for seq in range(2, 200):  # raised sqlite3.OperationalError (database or disk is full) before
        spool.put(result(seq))
    spool.put(critical(200))
    assert spool.write_failures >= 1 and len(unwritable) == 1 and "full" in unwritable[0]
    assert spool.held <= 50  # the memory bound, periodic results dropped first
    assert spool.dropped["result"] > 100
    spool.db.execute("PRAGMA max_page_count=1073741823")  # the disk has room again
    time.sleep(1.05)  # the retry is at most once a second
    spool.put(result(201))
    assert spool.held == 0
    seqs = drain(spool)
    assert seqs[0] == 1 and 200 in seqs and seqs[-1] == 201 and seqs == sorted(seqs)
    assert len(seqs) + spool.dropped["result"] == 201  # every message sent or counted as dropped
    spool.close()


def test_critical_events_are_kept_over_the_memory_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", memory_limit=5)
    fill_file(spool)
    for seq in range(1, 21):
        spool.put(critical(seq))
    assert spool.held > 5 and not spool.dropped
    assert drain(spool) == list(range(1, 21))


def test_acknowledged_rows_that_cannot_be_deleted_are_not_sent_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    for seq in range(1, 4):
        spool.put(result(seq))
    fill_file(spool)
    spool.db.execute("PRAGMA journal_mode=DELETE")  # a rollback journal: a delete needs room too
    sent = drain(spool)
    assert sent == [1, 2, 3] and len(spool) == 0


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_file_system(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small", "256k") as small:
        spool = Spool(small / "spool.db", memory_limit=100_000)
        filler = small / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        for seq in range(1, 2000):
            spool.put(result(seq))
        assert spool.write_failures >= 1 and spool.held > 0
        filler.unlink()
        time.sleep(1.05)
        spool.put(result(2000))
        assert drain(spool) == list(range(1, 2001))
        spool.close()


def test_a_corrupt_spool_is_moved_aside_and_a_new_one_started(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(os.urandom(8192))  # before: sqlite3.DatabaseError, the agent did not start
    spool = Spool(path)
    spool.put(result(1))
    assert drain(spool) == [1]
    aside = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 8192
    assert "spool_corrupt_moved_aside" in capsys.readouterr().out
    spool.close()


def test_a_damaged_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    for seq in range(1, 500):
        spool.put(result(seq))
    spool.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    spool.close()
    data = bytearray(path.read_bytes())
    data[4096 * 2:4096 * 3] = os.urandom(4096)  # one page of the table gone bad
    path.write_bytes(bytes(data))
    Spool(path).close()
    assert list(tmp_path.glob("spool.db.corrupt-*"))


def test_the_spool_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool.db")
        spool.put(result(1))
    finally:
        os.umask(old)
    for name in ("spool.db", "spool.db-wal"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    spool.close()


def test_a_row_leaves_only_on_the_controllers_ack_and_unacked_ones_are_sent_again(tmp_path: Path) -> None:
    from vetd.core import protocol

    spool = Spool(tmp_path / "spool.db")
    for seq in range(1, 6):
        spool.put(result(seq))
    sent = []
    for _ in range(5):
        pending = asyncio.run(spool.first())
        spool.done(pending)  # the broker's PUBACK
        sent.append(pending.seq)
    assert sent == [1, 2, 3, 4, 5] and len(spool) == 5 and spool.awaiting_ack()
    assert spool.acknowledge("s1", 1, 2) == 2 and spool.acknowledge("s1", 1, 2) == 0  # a duplicate ack
    assert spool.acknowledge("other-session", 3, 5) == 0 and len(spool) == 3
    spool.rewind()  # reconnect, or no ack for ack_timeout: the oldest unacknowledged goes first
    assert protocol.decode(asyncio.run(spool.first()).payload).seq == 3
    spool.close()
    again = Spool(tmp_path / "spool.db")  # an agent restart keeps what was not acknowledged
    assert len(again) == 3 and asyncio.run(again.first()).seq == 3
    again.close()


def test_acks_of_later_messages_do_not_put_off_resending_the_oldest(tmp_path: Path) -> None:
    """The ack timeout runs from the oldest message waiting: one lost on the way (dropped by a
    broker with no subscriber yet) is sent again even while the ones after it are acknowledged."""
    spool = Spool(tmp_path / "spool.db")
    for seq in range(1, 6):
        spool.put(result(seq))
    for _ in range(5):
        spool.done(asyncio.run(spool.first()))
    since = spool.progress_at
    time.sleep(0.01)
    assert spool.acknowledge("s1", 2, 5) == 4  # 1 was lost: the later ones are no progress
    assert spool.progress_at == since and spool.awaiting_ack()
    assert spool.acknowledge("s1", 1, 1) == 1
    assert spool.progress_at > since and not spool.awaiting_ack() and len(spool) == 0
    spool.close()


def test_held_rows_wait_for_the_ack_too_and_critical_events_are_never_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", limit=10, memory_limit=5)
    for seq in range(1, 11):
        spool.put(critical(seq) if seq % 2 else result(seq))
    for _ in range(10):
        spool.done(asyncio.run(spool.first()))  # all sent, none acknowledged
    for seq in range(11, 21):  # the bound counts unacknowledged rows: periodic ones make room
        spool.put(critical(seq) if seq % 2 else result(seq))
    assert len(spool) >= 10 and spool.dropped["result"] >= 5
    fill_file(spool)
    for seq in range(21, 31):
        spool.put(critical(seq))
    assert spool.held == 10  # over the memory bound: only critical events, all kept
    pending = asyncio.run(spool.first())
    while pending.where != "held":
        spool.done(pending)
        pending = asyncio.run(spool.first())
    spool.done(pending)
    assert spool.held == 10  # sent, not acknowledged: still held
    spool.acknowledge("s1", 21, 21)
    assert spool.held == 9
    spool.rewind()
    spool.db.execute("PRAGMA max_page_count=1073741823")
    time.sleep(1.05)
    seqs = drain(spool)
    odd = [s for s in range(1, 31) if s % 2 and s != 21]
    assert [s for s in seqs if s % 2] == odd  # every critical event, in order
    spool.close()


def test_a_spool_from_before_acks_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    from vetd.core import protocol

    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
               "priority INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)")
    message = result(7)
    db.execute("INSERT INTO spool (kind, priority, topic, payload) VALUES ('result', 0, ?, ?)",
               (protocol.topic_for(message), protocol.encode(message)))
    db.commit()
    db.close()
    spool = Spool(path)
    pending = asyncio.run(spool.first())
    assert (pending.session, pending.seq) == ("s1", 7)
    spool.done(pending)
    assert spool.acknowledge("s1", 7, 7) == 1 and len(spool) == 0
    spool.close()
