"""``[plugins.gpu_compute]``: sizes per profile, floors, deadlines.

Expected values come from the SKU table shipped with the plugin
(``skus.toml``); ``floors`` here overrides it for every GPU of the node and is
how a site judges a GPU the table does not know.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from vetd.agent.api import Duration

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Mib = Annotated[int, msgspec.Meta(ge=1, le=1 << 22)]
GemmDtype = Literal["fp64", "fp32", "fp16"]


class GpuComputeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Where the numerics run: ``cupy`` (one worker process per GPU) or ``numpy``
    #: (one worker on the CPU, entity ``cpu``: CI, a protocol's dry run on a login
    #: node; `vetd check --array-backend numpy` sets it). The code is the same.
    array_backend: Literal["cupy", "numpy"] = "cupy"
    #: GEMM dtypes; FP32 runs with TF32 off, FP16 on tensor cores.
    gemm_dtypes: list[GemmDtype] = msgspec.field(default_factory=lambda: ["fp64", "fp32", "fp16"])
    #: GEMM size n (n×n times n×n) in profile ``prolog`` / ``full``.
    gemm_n_prolog: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 4096
    gemm_n_full: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 8192
    #: Timed GEMMs per dtype after one warm-up; the best one counts.
    gemm_repeats_prolog: Positive = 3
    gemm_repeats_full: Positive = 20
    #: Share of the GPU's free memory the memtest writes and verifies.
    memtest_fraction_prolog: Fraction = 0.02
    memtest_fraction_full: Fraction = 0.8
    #: Passes of each pattern (walking ones, address/complement, seeded random).
    memtest_passes_prolog: Positive = 1
    memtest_passes_full: Positive = 4
    #: Bytes per array of the copy and triad kernels (MiB).
    stream_mib_prolog: Mib = 1024
    stream_mib_full: Mib = 4096
    #: Bytes of each pinned host↔device copy (MiB).
    pcie_mib_prolog: Mib = 256
    pcie_mib_full: Mib = 1024
    #: Timed repeats of each bandwidth measurement; the best one counts (as STREAM).
    bandwidth_repeats: Positive = 5
    #: With ``array_backend = "numpy"``: the CPU runs the same code on these sizes.
    numpy_gemm_n: Annotated[int, msgspec.Meta(ge=16, le=8192)] = 512
    numpy_memtest_mib: Mib = 32
    numpy_stream_mib: Mib = 64
    #: Below the floor: ``warn`` (``gemm_slow``, ``bandwidth_low``…); below this
    #: share of the floor: ``fail``.
    fail_fraction_of_floor: Fraction = 0.5
    #: The host↔device floor as a share of what the PCIe link carries (gen × width);
    #: AzNHC's 48 GB/s on Gen5 x16 is 0.76 of the link's 63 GB/s.
    pcie_floor_fraction: Fraction = 0.7
    #: Site floors by metric (``tflops_fp64``, ``copy_gbps``, ``triad_gbps``,
    #: ``h2d_gbps``, ``d2h_gbps``): used instead of the SKU table's, for every GPU.
    floors: dict[str, float] = {}
    #: A site's SKU table (same format as the shipped ``skus.toml``), read before the shipped one.
    sku_file: str = ""
    #: Deadline of one worker (every test of one run on one GPU) in ``prolog`` / ``full``;
    #: a worker still running is killed (``timeout``).
    timeout_prolog: Duration = Duration(60.0)
    timeout_full: Duration = Duration(1800.0)
