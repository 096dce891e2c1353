"""One rank of an NCCL pair, in a process of its own: ``python -m vetd.plugins.nccl.pairworker``.

Started by :class:`vetd.plugins.nccl.pairs.NcclPairEndpoint` on each node of a
pair, on the node's first GPU (``CUDA_VISIBLE_DEVICES`` as the job set it).
The lead (``--uid new``) creates the NCCL unique id and prints it as the
first line of its output (hex) before it joins; the other is given it
(``--uid HEX``). Both then join a two-rank communicator and, for ``--seconds``
after a warm-up, send ``--bytes`` to each other at once (``ncclSend`` and
``ncclRecv`` of each rank in one group: both directions of the pair, as the
TCP probe measures them) and check what arrived (each rank sends
``rank + 1``). The last line is the result as JSON: ``gbps`` (bytes sent per
second by this rank, decimal GB/s), ``iters``, ``bytes``, ``seconds``,
``wrong_elements``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vetd.plugins.nccl.pairworker")
    parser.add_argument("--rank", type=int, choices=(0, 1), required=True)
    parser.add_argument("--uid", required=True, help="'new' (the lead) or the lead's unique id in hex")
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    import cupy
    from cupy.cuda import nccl

    if args.uid == "new":
        uid = nccl.get_unique_id()
        print(bytes(b % 256 for b in uid).hex(), flush=True)
    else:
        raw = bytes.fromhex(args.uid)
        uid = tuple(b - 256 if b > 127 else b for b in raw)
    count = max(1, args.bytes // 4)
    cupy.cuda.Device(0).use()
    comm = nccl.NcclCommunicator(2, uid, args.rank)
    stream = cupy.cuda.Stream(non_blocking=True)
    send = cupy.full(count, args.rank + 1, dtype=cupy.float32)
    recv = cupy.zeros(count, dtype=cupy.float32)
    other = 1 - args.rank

    def exchange() -> None:
        nccl.groupStart()
        comm.send(send.data.ptr, count, nccl.NCCL_FLOAT32, other, stream.ptr)
        comm.recv(recv.data.ptr, count, nccl.NCCL_FLOAT32, other, stream.ptr)
        nccl.groupEnd()

    for _ in range(args.warmup):
        exchange()
    stream.synchronize()
    # both ranks must run the same number of exchanges: agree on it from the warm-up's pace
    start = time.perf_counter()
    exchange()
    stream.synchronize()
    one = max(time.perf_counter() - start, 1e-6)
    iters = max(1, min(100_000, int(args.seconds / one)))
    counts = cupy.array([iters], dtype=cupy.int64)
    comm.allReduce(counts.data.ptr, counts.data.ptr, 1, nccl.NCCL_INT64, nccl.NCCL_MAX, stream.ptr)
    stream.synchronize()
    iters = int(counts.get()[0])
    start = time.perf_counter()
    for _ in range(iters):
        exchange()
    stream.synchronize()
    seconds = time.perf_counter() - start
    wrong = int(cupy.count_nonzero(recv != other + 1))
    print(json.dumps({"gbps": count * 4 * iters / seconds / 1e9, "iters": iters, "bytes": count * 4,
                      "seconds": seconds, "wrong_elements": wrong}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
