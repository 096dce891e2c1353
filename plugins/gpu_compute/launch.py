"""Worker processes for the agent: one per GPU in parallel, each killed at its deadline.

The agent side of :mod:`vetd.plugins.gpu_compute.worker`. A worker's fate is
always a result: what it wrote for each test, else ``timeout`` (killed at the
deadline: the test it was in, and those it never reached), else ``error``
(it crashed, was killed by a signal, or exited without a result). Never a pass.

The checks of one ``vetd check`` or ``revet`` start together; their requests
are gathered into one batch (:class:`Batcher`) so each GPU gets one worker that
runs the tests one after another: one CUDA context per GPU per run, and no test
measures while another loads the same GPU. :data:`GPU_LOCK` keeps batches and
the NCCL run (which uses every GPU) apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vetd.agent.api import ProcError, ProcTimeout, run_process

#: Held while workers use the GPUs: gpu_compute batches and the NCCL run take turns.
GPU_LOCK = threading.Lock()
#: Fault injection for workers (see :mod:`vetd.plugins.gpu_compute.worker`).
INJECT_ENV = "VETD_GPU_COMPUTE_INJECT"
WORKER_MODULE = "vetd.plugins.gpu_compute.worker"


@dataclass(frozen=True)
class Job:
    """One worker: the entity its results are for and the GPUs it may see (None: the CPU backend)."""

    entity: str
    visible: str | None


def failure(status: str, code: str, message: str) -> dict[str, Any]:
    return {"failed": status, "code": code, "message": message}


async def _one(job: Job, specs: Sequence[Mapping[str, Any]], backend: str, deadline: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="vetd-gpu-") as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if job.visible is not None:
            env.update(CUDA_VISIBLE_DEVICES=job.visible, CUDA_DEVICE_ORDER="PCI_BUS_ID")  # NVML's order
        argv = [sys.executable, "-m", WORKER_MODULE, "--backend", backend, "--out", tmp, json.dumps(list(specs))]
        if inject := os.environ.get(INJECT_ENV, ""):
            argv[3:3] = ["--inject", inject]
        fate: dict[str, Any] | None = None
        try:
            done = await run_process(argv, deadline, env=env)
            if done.returncode != 0:
                how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                       else f"exited {done.returncode}")
                tail = done.stderr.strip().splitlines()[-3:]
                fate = failure("error", "worker_crashed", f"GPU worker {how}" + (f": {' | '.join(tail)}" if tail else ""))
        except ProcTimeout:
            fate = failure("timeout", "worker_timeout", f"GPU worker killed at its {deadline:g}s deadline")
        except ProcError as exc:
            fate = failure("error", "worker_failed", str(exc))
        results: list[dict[str, Any]] = []
        for index, spec in enumerate(specs):
            path = Path(tmp) / f"{index:02d}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
            elif fate is not None:
                results.append(dict(fate))
                if fate["failed"] == "timeout" and index < len(specs) - 1:
                    fate = failure("timeout", "worker_timeout", f"not run: the worker was killed during {spec['test']}")
            else:
                results.append(failure("error", "worker_no_result", "GPU worker exited without a result"))
        return results


def run_workers(jobs: Sequence[Job], specs: Sequence[Mapping[str, Any]], backend: str,
                deadline: float) -> dict[str, list[dict[str, Any]]]:
    """Every job's worker in parallel (blocking; call from a check's thread): entity → one result per spec."""

    async def everything() -> list[list[dict[str, Any]]]:
        return list(await asyncio.gather(*(_one(job, specs, backend, deadline) for job in jobs)))

    with GPU_LOCK:
        return dict(zip((job.entity for job in jobs), asyncio.run(everything()), strict=True))


@dataclass
class _Batch:
    tests: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    results: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


class Batcher:
    """Gathers the tests asked for within ``window`` seconds into one call of ``run_batch``."""

    def __init__(self, run_batch: Callable[[list[str]], dict[str, Any]], window: float = 0.05) -> None:
        self._run_batch, self._window = run_batch, window
        self._lock = threading.Lock()
        self._open: _Batch | None = None

    def request(self, test: str) -> Any:
        with self._lock:
            batch, leader = self._open, False
            if batch is None:
                batch, leader = _Batch(), True
                self._open = batch
            batch.tests.append(test)
        if leader:
            time.sleep(self._window)
            with self._lock:
                self._open = None
            try:
                batch.results = self._run_batch(list(dict.fromkeys(batch.tests)))
            except BaseException as exc:  # noqa: BLE001 - every waiting check gets the error
                batch.error = exc
            finally:
                batch.done.set()
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[test]
