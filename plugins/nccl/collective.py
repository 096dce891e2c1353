"""The all-reduce sweep, run inside a GPU worker (:mod:`vetd.plugins.gpu_compute.worker`) through ``cupy.cuda.nccl``.

One process drives every GPU of the node: communicators from
``NcclCommunicator.initAll``, each all-reduce issued for all ranks between
``groupStart()`` and ``groupEnd()``, one stream per GPU. One process rather
than one per GPU: no rendezvous (no unique-id exchange, no ports, no MPI), one
deadline and one kill, and it is what nccl-tests does with ``-g N``. The
bandwidth is NCCL's either way: the same rings and trees, the same NVLink/NVLS.

Per size: ``warmup`` untimed all-reduces, then ``iters`` timed back to back; the
time of one is the mean (nccl-tests' default). ``algbw = bytes / time``,
``busbw = algbw × 2(n−1)/n`` (nccl-tests' all-reduce definition), decimal GB/s.
The buffers hold ``rank + 1`` so every element of the result must be
``n(n+1)/2``; a wrong sum is reported (``wrong_elements``).
"""

from __future__ import annotations

import time
from typing import Any

from vetd.plugins.gpu_compute.numerics import busbw_factor, size_sweep


def allreduce_sweep(xp: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from cupy.cuda import nccl

    devices = list(range(xp.cuda.runtime.getDeviceCount()))
    if spec.get("ranks"):
        devices = devices[: int(spec["ranks"])]
    ranks = len(devices)
    comms = nccl.NcclCommunicator.initAll(devices)
    streams, sends, recvs = [], [], []
    largest = int(spec["max_bytes"])
    for rank, device in enumerate(devices):
        with xp.cuda.Device(device):
            streams.append(xp.cuda.Stream(non_blocking=True))
            sends.append(xp.full(largest // 4, rank + 1, dtype=xp.float32))
            recvs.append(xp.zeros(largest // 4, dtype=xp.float32))

    def allreduce(count: int) -> None:
        nccl.groupStart()
        for rank, comm in enumerate(comms):
            with xp.cuda.Device(devices[rank]):
                comm.allReduce(sends[rank].data.ptr, recvs[rank].data.ptr, count, nccl.NCCL_FLOAT32,
                               nccl.NCCL_SUM, streams[rank].ptr)
        nccl.groupEnd()

    def wait() -> None:
        for stream in streams:
            stream.synchronize()

    table = []
    wrong = 0
    for size in size_sweep(int(spec["min_bytes"]), largest):
        count = max(1, size // 4)
        for _ in range(int(spec["warmup"])):
            allreduce(count)
        wait()
        start = time.perf_counter()
        for _ in range(int(spec["iters"])):
            allreduce(count)
        wait()
        seconds = (time.perf_counter() - start) / int(spec["iters"])
        algbw = count * 4 / seconds / 1e9
        table.append({"bytes": count * 4, "time_us": seconds * 1e6, "algbw_gbps": algbw,
                      "busbw_gbps": algbw * busbw_factor(ranks)})
        expected = ranks * (ranks + 1) / 2
        for rank, device in enumerate(devices):
            with xp.cuda.Device(device):
                wrong += int(xp.count_nonzero(recvs[rank][:count] != expected))
    return {"ranks": ranks, "sizes": table, "wrong_elements": wrong}
