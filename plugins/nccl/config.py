"""``[plugins.nccl]``: the all-reduce size sweep, iterations, floors, deadlines."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from vetd.agent.api import Duration

Positive = Annotated[int, msgspec.Meta(ge=1)]
Bytes = Annotated[int, msgspec.Meta(ge=4, le=1 << 40)]


class NcclConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: ``cupy`` runs NCCL; ``numpy`` (a dry run on a CPU) reports ``skip`` (``cpu_backend``).
    array_backend: Literal["cupy", "numpy"] = "cupy"
    #: Size sweep in bytes, doubling from the smallest to the largest (``prolog`` / ``full``).
    min_bytes: Bytes = 1 << 20
    max_bytes_prolog: Bytes = 1 << 30
    max_bytes_full: Bytes = 8 << 30
    #: Untimed all-reduces per size, then timed ones (the mean counts, as nccl-tests).
    warmup_iters: Positive = 5
    iters_prolog: Positive = 20
    iters_full: Positive = 50
    #: Peak bus bandwidth floor in decimal GB/s; 0: the SKU table's for this GPU count.
    #: A vetnode protocol's ``min_bandwidth`` sets it.
    min_busbw_gbps: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    #: Below the floor: ``warn`` (``busbw_low``); below this share of it: ``fail``.
    fail_fraction_of_floor: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    #: Run one rank on a one-GPU node (a local copy: exercises the code path,
    #: measures no link) instead of ``skip`` (``single_gpu``). `vetd check --force` sets it.
    single_rank: bool = False
    #: Deadline of the NCCL worker in ``prolog`` / ``full``; killed beyond it (``timeout``).
    timeout_prolog: Duration = Duration(60.0)
    timeout_full: Duration = Duration(900.0)
    #: ``nccl_pairs`` (``vetd vet``): bytes each GPU sends its peer per exchange, how long
    #: each pair is measured, and the worker's start-up (CUDA context, NCCL communicator)
    #: allowed on top before it is killed.
    pair_bytes: Bytes = 256 << 20
    pair_seconds: Duration = Duration(3.0)
    pair_overhead: Duration = Duration(60.0)
