"""Spool cost: writing a result to the on-disk spool, and removing it once acknowledged."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vetd.agent.spool import Spool
from vetd.core.protocol import Result


def measure(sync: str, count: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool.db", limit=10 * count, sync=sync)
        message = Result(cluster="alps", node="nid001", session="s", seq=1, ts=time.time(), check="gpu_health",
                         status="pass", entity="gpu3", metrics={"temp_c": 41.0, "power_w": 300.0}, message="ok")
        t0 = time.perf_counter()
        for _ in range(count):
            spool.put(message)
        put = (time.perf_counter() - t0) / count
        import asyncio

        async def drain() -> float:
            t1 = time.perf_counter()
            for _ in range(count):
                spool.done(await spool.first())
            return (time.perf_counter() - t1) / count

        done = asyncio.run(drain())
        spool.close()
    return put, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for sync in ("normal", "full"):
        runs = [measure(sync, args.count if sync == "normal" else max(200, args.count // 10)) for _ in range(args.runs)]
        put = statistics.median(r[0] for r in runs)
        done = statistics.median(r[1] for r in runs)
        print(f"spool_sync={sync}: put {1e6 * put:.0f} us per result, read+remove {1e6 * done:.0f} us "
              f"(median of {args.runs} runs)")


if __name__ == "__main__":
    main()
