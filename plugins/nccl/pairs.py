"""``nccl_pairs``: NCCL send/receive between the GPUs of two nodes, the pair test ``vetd vet`` prefers.

The rounds, rendezvous and localisation are the same as for ``tcp_pairs``
(``agent/fabric.py``); only the measurement differs. For each pair the
lead (the lower rank) starts a worker (:mod:`vetd.plugins.nccl.pairworker`)
that creates NCCL's unique id, sends it to the other node's endpoint over a
small TCP side channel (the port announced through the rendezvous), and both
workers measure both directions at once over the job's NCCL network (IB,
Slingshot through the OFI plugin, or sockets). A worker runs in a process of
its own and is killed at the round's deadline: a hung NCCL is a failed
measurement, never a hung ``vetd vet``.

Unavailable (the run falls back to ``tcp_pairs`` under ``--test auto``, or
reports the pairs skipped under ``--test nccl_pairs``): no NVIDIA GPU, no CuPy,
or ``array_backend = "numpy"``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from vetd.agent.api import PairSample, PairServer, Peer
from vetd.plugins.nccl.config import NcclConfig

#: The unique id of a pair, sent by the lead: ``key`` (a line), then the id in hex (a line).
ID_WAIT_S = 60.0
#: The worker module; tests put a stand-in here (no GPU) to exercise the hand-over and the deadlines.
WORKER_ENV = "VETD_NCCL_PAIR_WORKER"
WORKER_MODULE = "vetd.plugins.nccl.pairworker"


def unavailable(config: NcclConfig) -> str:
    from vetd.plugins.gpu_compute.runtime import cupy_missing
    from vetd.plugins.gpu_health.sources import nvidia_gpus_in_sysfs

    if config.array_backend == "numpy":
        return "array_backend is numpy: NCCL needs CUDA"
    if why := cupy_missing():
        return why
    if nvidia_gpus_in_sysfs() == 0:
        return "no NVIDIA GPU on this node"
    return ""


class NcclPairEndpoint(PairServer):
    """Receives unique ids from leads on a side-channel port (:class:`~vetd.agent.api.PairServer`);
    runs one worker per measurement."""

    name = "nccl_pairs"

    def __init__(self, config: NcclConfig) -> None:
        self.config = config
        self._ids: dict[str, str] = {}
        self._arrived = threading.Condition()
        super().__init__(0, max_connections=64, backlog=64)

    def serve_peer(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            lines = conn.makefile("r", encoding="ascii").read(4096).split("\n")
        except UnicodeDecodeError:
            return
        if len(lines) >= 2 and lines[0] and lines[1]:
            with self._arrived:
                self._ids[lines[0]] = lines[1]
                self._arrived.notify_all()

    def _worker(self, rank: int, uid: str, seconds: float) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", os.environ.get(WORKER_ENV) or WORKER_MODULE, "--rank", str(rank), "--uid", uid,
                "--bytes", str(self.config.pair_bytes), "--seconds", str(seconds)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def measure(self, peer: Peer, seconds: float, lead: bool, key: str) -> PairSample:
        deadline = time.monotonic() + seconds + float(self.config.pair_overhead)
        if lead:
            worker = self._worker(0, "new", seconds)
            assert worker.stdout is not None
            uid = worker.stdout.readline().strip()
            if not uid:
                return self._finish(worker, deadline, peer, "the NCCL worker made no unique id")
            try:
                with socket.create_connection((peer.host, int(peer.info.get("port", 0))), timeout=10) as conn:
                    conn.sendall(f"{key}\n{uid}\n".encode("ascii"))
            except OSError as exc:
                worker.kill()
                return PairSample(gbps=None, error=f"cannot hand the NCCL id to {peer.node}: {exc}")
        else:
            with self._arrived:
                self._arrived.wait_for(lambda: key in self._ids, timeout=min(ID_WAIT_S, deadline - time.monotonic()))
                uid = self._ids.pop(key, "")
            if not uid:
                return PairSample(gbps=None, error=f"no NCCL id from {peer.node}")
            worker = self._worker(1, uid, seconds)
        return self._finish(worker, deadline, peer, "")

    def _finish(self, worker: subprocess.Popen[str], deadline: float, peer: Peer, error: str) -> PairSample:
        try:
            out, err = worker.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
            return PairSample(gbps=None, error=f"NCCL with {peer.node} did not finish in time (killed)")
        if error:
            return PairSample(gbps=None, error=error)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if worker.returncode != 0 or not lines:
            tail = " | ".join(err.strip().splitlines()[-2:])
            return PairSample(gbps=None, error=f"NCCL worker exited {worker.returncode}: {tail}")
        result = json.loads(lines[-1])
        if result["wrong_elements"]:
            return PairSample(gbps=None, error=f"{result['wrong_elements']} wrong elements received from "
                              f"{peer.node}", detail={"wrong_elements": float(result["wrong_elements"])})
        return PairSample(gbps=float(result["gbps"]), detail={
            "bytes": float(result["bytes"]), "iters": float(result["iters"]), "seconds": round(result["seconds"], 4)})
