"""The short-lived process that touches a GPU: ``python -m vetd.plugins.gpu_compute.worker``.

The agent never holds a CUDA context (it costs GPU memory and blocks jobs on
EXCLUSIVE_PROCESS GPUs): each run starts one of these per GPU with
``CUDA_VISIBLE_DEVICES`` pinned (the NCCL run: one for all GPUs), kills it at
its deadline, and reads what it wrote. Each test's result is written to its
own file in ``--out`` the moment it is done, so the tests finished before a
hang or a crash keep their results.

``--inject`` proves the detectors and the isolation on a real node:
``gemm_bitflip`` flips an exponent bit of one product element,
``memtest_badword`` flips a bit of one word per pattern pass, ``hang`` sleeps,
``abort`` calls ``os.abort()``, ``raise`` raises in every test. The agent
passes ``$VETD_GPU_COMPUTE_INJECT`` here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vetd.plugins.gpu_compute import numerics

INJECTIONS = ("gemm_bitflip", "memtest_badword", "hang", "abort", "raise")


class Backend:
    """``xp`` and what differs between NumPy and CuPy beyond the array API."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "numpy":
            import numpy

            self.xp: Any = numpy
            return
        os.environ["CUPY_TF32"] = "0"  # FP32 GEMM in FP32, not TF32 (before cupy is imported)
        import cupy

        self.xp = cupy

    def sync(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()

    def device_name(self) -> str:
        if self.name == "numpy":
            return "cpu"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def free_bytes(self) -> int:
        return int(self.xp.cuda.runtime.memGetInfo()[0])

    def triad(self) -> Callable[..., object] | None:
        if self.name == "numpy":
            return None
        kernel = self.xp.ElementwiseKernel("T b, T c, T s", "T a", "a = b + s * c", "vetd_triad")
        return lambda a, b, c, s: kernel(b, c, self.xp.float64(s), a)

    def pinned(self, nbytes: int) -> Any:
        if self.name == "numpy":
            return self.xp.zeros(nbytes, dtype=self.xp.uint8)
        import cupyx

        host = cupyx.empty_pinned((nbytes,), dtype=self.xp.uint8)
        host[...] = 1
        return host


def _flip_exponent(array: Any, _what: str) -> None:
    bits = {8: "uint64", 4: "uint32", 2: "uint16"}[array.itemsize]
    view = array.view(bits)
    top_exponent = 1 << (8 * array.itemsize - 2)
    view[1, 2] ^= view.dtype.type(top_exponent)


def _flip_word(buffer: Any, _what: str) -> None:
    buffer[buffer.size // 2] ^= buffer.dtype.type(1)


def run_test(backend: Backend, spec: dict[str, Any], inject: str) -> dict[str, Any]:
    xp, sync, test = backend.xp, backend.sync, spec["test"]
    if inject == "raise":
        raise RuntimeError("injected failure (VETD_GPU_COMPUTE_INJECT=raise)")
    corrupt: numerics.Corrupt | None
    if test == "gemm":
        corrupt = _flip_exponent if inject == "gemm_bitflip" else None
        return {dtype: numerics.gemm(xp, sync, dtype, spec["n"], spec["repeats"], corrupt=corrupt)
                for dtype in spec["dtypes"]}
    if test == "memtest":
        if backend.name == "numpy":
            nbytes = spec["mib"] << 20
        else:
            nbytes = int(backend.free_bytes() * spec["fraction"])
        words = max(1024, nbytes // 4)
        corrupt = _flip_word if inject == "memtest_badword" else None
        return numerics.memtest(xp, sync, words, spec["passes"], seed=int(time.time()) & 0xFFFF, corrupt=corrupt)
    if test == "stream":
        return numerics.stream(xp, sync, spec["mib"] << 20, spec["repeats"], triad=backend.triad())
    if test == "pcie":
        nbytes = spec["mib"] << 20
        host = backend.pinned(nbytes)
        return numerics.host_device(xp, sync, nbytes, spec["repeats"], host,
                                    to_device=lambda d, h: d.set(h), to_host=lambda d, h: d.get(out=h))
    if test == "nccl":
        from vetd.plugins.nccl.collective import allreduce_sweep

        return allreduce_sweep(xp, spec)
    raise ValueError(f"unknown test {test!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("cupy", "numpy"), required=True)
    parser.add_argument("--out", required=True, help="folder: one JSON file per test, written when it is done")
    parser.add_argument("--inject", choices=INJECTIONS, default=None)
    parser.add_argument("tests", help="JSON list of test specs ({test, ...params})")
    args = parser.parse_args(argv)
    out, specs, inject = Path(args.out), json.loads(args.tests), args.inject or ""
    if inject == "abort":
        os.abort()
    if inject == "hang":
        time.sleep(86400)
    try:
        backend = Backend(args.backend)
        if backend.name == "cupy":
            backend.xp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no CUDA here is a finding for every test, not a crash
        for i, spec in enumerate(specs):
            _write(out, i, {"test": spec["test"], "skip": "no_cuda", "message": f"{type(exc).__name__}: {exc}"})
        return 0
    device = backend.device_name()
    for i, spec in enumerate(specs):
        started = time.perf_counter()
        try:
            result: dict[str, Any] = {"test": spec["test"], "device": device,
                                      "result": run_test(backend, spec, inject)}
        except Exception as exc:  # noqa: BLE001 - a CUDA error is this test's result; the next may still run
            result = {"test": spec["test"], "device": device, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=4)}
        result["seconds"] = time.perf_counter() - started
        _write(out, i, result)
    return 0


def _write(out: Path, index: int, result: dict[str, Any]) -> None:
    partial = out / f"{index:02d}.json.part"
    partial.write_text(json.dumps(result))
    partial.replace(out / f"{index:02d}.json")


if __name__ == "__main__":
    sys.exit(main())
