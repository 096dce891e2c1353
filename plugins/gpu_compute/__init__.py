"""``gpu_compute``: make every GPU work and check what it computes (profiles ``prolog``, ``full``).

Checks, one result per GPU (``gpu0``…):

* ``gpu_gemm``: FP64, FP32 (TF32 off) and FP16 (tensor cores) GEMM; the
  column-sum checksum (``gemm_wrong``) and TFLOP/s against the SKU floor (``gemm_slow``).
* ``gpu_memory_bandwidth``: device copy and triad, GB/s as STREAM counts (``bandwidth_low``).
* ``gpu_memtest``: walking ones, address/complement and seeded random
  patterns over a share of free memory (``memtest_bad_words``).
* ``gpu_pcie_bandwidth``: pinned host↔device copies against the PCIe link (``pcie_slow``).

Each run is a worker process per GPU (:mod:`~vetd.plugins.gpu_compute.launch`);
the agent holds no CUDA context. Without CuPy every check is ``skip``
(``no_cuda``); a GPU with compute processes is ``skip`` (``gpu_busy``). The
numerics (:mod:`~vetd.plugins.gpu_compute.numerics`) run on NumPy too
(``array_backend = "numpy"``, `vetd check --array-backend numpy`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from vetd.agent.api import Check, hookimpl
from vetd.plugins.gpu_compute.config import GpuComputeConfig
from vetd.plugins.gpu_compute.runtime import PROFILES, ComputeRuntime

if TYPE_CHECKING:
    from vetd.agent.api import CheckRegistry, PluginConfigs

_runtimes: weakref.WeakKeyDictionary[PluginConfigs, ComputeRuntime] = weakref.WeakKeyDictionary()

DESCRIPTIONS = {
    "gpu_gemm": "GEMM FP64/FP32/FP16: checksum and TFLOP/s per GPU",
    "gpu_memory_bandwidth": "device copy and triad GB/s (STREAM) per GPU",
    "gpu_memtest": "write/verify memory patterns per GPU",
    "gpu_pcie_bandwidth": "pinned host<->device copy GB/s against the PCIe link",
}


def runtime_for(configs: PluginConfigs) -> ComputeRuntime:
    runtime = _runtimes.get(configs)
    if runtime is None:
        runtime = _runtimes[configs] = ComputeRuntime(configs.typed("gpu_compute", GpuComputeConfig), configs)
    return runtime


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"gpu_compute": GpuComputeConfig}


@hookimpl
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    runtime = runtime_for(configs)
    # The worker's own deadline ends a stuck run; the check's is a backstop past it.
    timeout = float(max(runtime.config.timeout_prolog, runtime.config.timeout_full)) + 30.0
    for name, description in DESCRIPTIONS.items():
        registry.add(Check(name, functools.partial(runtime.check, name), timeout, profiles=PROFILES,
                           description=description))
