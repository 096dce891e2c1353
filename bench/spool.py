"""Spool cost: writing a result to the on-disk spool, and removing it once acknowledged.

Removing is what the transport does for each result: read it (``first``), mark it sent on the
broker's PUBACK (``done``) and drop it on the controller's ack (``acknowledge``, one ack per
result here: the worst case; the controller acknowledges ranges).

Checked before any figure: every result put is spooled, given back once and in order, and the
spool is empty after. Figures go to bench/results/spool.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from bench.record import verify, write_results
from vetd.agent.spool import Spool
from vetd.core import protocol
from vetd.core.protocol import Result


def measure(sync: str, count: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool.db", limit=10 * count, sync=sync)
        message = Result(cluster="alps", node="nid001", session="s", seq=1, ts=time.time(), check="gpu_health",
                         status="pass", entity="gpu3", metrics={"temp_c": 41.0, "power_w": 300.0}, message="ok")
        t0 = time.perf_counter()
        for seq in range(1, count + 1):
            spool.put(msgspec.structs.replace(message, seq=seq))
        put = (time.perf_counter() - t0) / count
        verify(len(spool) == count, f"{len(spool)} results spooled of {count} put")

        async def drain() -> tuple[float, list[int]]:
            seqs = []
            t1 = time.perf_counter()
            for _ in range(count):
                pending = await spool.first()
                seqs.append(protocol.decode(pending.payload).seq)
                spool.done(pending)  # the broker's PUBACK: sent, kept until the controller's ack
                spool.acknowledge(pending.session, pending.seq, pending.seq)
            return (time.perf_counter() - t1) / count, seqs

        done, seqs = asyncio.run(drain())
        verify(seqs == list(range(1, count + 1)), "the spool gave back every result once, in order")
        verify(len(spool) == 0, f"{len(spool)} left in the spool after removing every result")
        spool.close()
    return put, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures = {}
    for sync in ("normal", "full"):
        runs = [measure(sync, args.count if sync == "normal" else max(200, args.count // 10)) for _ in range(args.runs)]
        put = statistics.median(r[0] for r in runs)
        done = statistics.median(r[1] for r in runs)
        print(f"spool_sync={sync}: put {1e6 * put:.0f} us per result, read+sent+acked {1e6 * done:.0f} us "
              f"(median of {args.runs} runs)")
        figures |= {f"{sync}_put_us": round(1e6 * put, 1), f"{sync}_read_remove_us": round(1e6 * done, 1)}
    print(f"written to {write_results('spool', figures, count=args.count, runs=args.runs)}")


if __name__ == "__main__":
    main()
