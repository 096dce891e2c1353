"""The compute checks' numerics on NumPy: the same code a GPU runs through CuPy."""

from __future__ import annotations

import numpy as np
import pytest

from vetd.plugins.gpu_compute import numerics
from vetd.plugins.gpu_compute.config import GpuComputeConfig
from vetd.plugins.gpu_compute.runtime import Target, judge
from vetd.plugins.gpu_compute.worker import _flip_exponent


def nosync() -> None:
    return None


def gemm_result(corrupt: numerics.Corrupt | None = None, n: int = 256) -> dict[str, object]:
    return {"device": "NVIDIA H200", "result": {d: numerics.gemm(np, nosync, d, n, 1, corrupt=corrupt)
                                                for d in numerics.GEMM_DTYPES}}


H200 = Target(entity="gpu0", index=0, name="NVIDIA H200", pcie_gen_max=5, pcie_width_max=16)


@pytest.mark.parametrize("dtype", numerics.GEMM_DTYPES)
def test_a_correct_product_is_within_its_tolerance(dtype: str) -> None:
    result = numerics.gemm(np, nosync, dtype, 384, 1)
    assert 0 <= result["checksum_error"] < result["tolerance"] / 4
    assert result["tflops"] > 0


@pytest.mark.parametrize("dtype", numerics.GEMM_DTYPES)
def test_one_flipped_sign_bit_in_the_product_is_caught(dtype: str) -> None:
    def flip_sign(c: np.ndarray, _what: str) -> None:
        view = c.view({8: np.uint64, 4: np.uint32, 2: np.uint16}[c.itemsize])
        view[100, 7] ^= view.dtype.type(1 << (8 * c.itemsize - 1))

    result = numerics.gemm(np, nosync, dtype, 256, 1, corrupt=flip_sign)
    assert result["checksum_error"] > result["tolerance"]


def test_a_flipped_bit_in_the_product_fails_gpu_gemm_with_gemm_wrong() -> None:
    outcome = judge("gemm", H200, gemm_result(_flip_exponent), GpuComputeConfig())
    assert outcome.status == "fail" and outcome.codes == ["gemm_wrong"]
    assert "checksum error" in outcome.message


def test_a_slow_gpu_warns_then_fails_against_its_sku_floor() -> None:
    result = gemm_result()
    unknown = Target(entity="gpu0", index=0, name="NVIDIA B300")  # judged by the site's floors alone
    ok = judge("gemm", unknown, result, GpuComputeConfig(floors={"tflops_fp64": 1e-9}))
    assert ok.status == "pass" and ok.codes == []
    warned = judge("gemm", H200, result, GpuComputeConfig())  # the CPU is far below an H200's floor: < half → fail
    assert warned.status == "fail" and "gemm_slow" in warned.codes
    tflops = result["result"]["fp64"]["tflops"]  # type: ignore[index]
    slow = judge("gemm", unknown, result, GpuComputeConfig(floors={"tflops_fp64": tflops * 1.5}, gemm_dtypes=["fp64"]))
    assert slow.status in ("warn", "fail") and "gemm_slow" in slow.codes


def test_an_unknown_gpu_is_measured_and_passes_with_no_reference() -> None:
    unknown = Target(entity="gpu0", index=0, name="NVIDIA B300")
    outcome = judge("gemm", unknown, {**gemm_result(), "device": "NVIDIA B300"}, GpuComputeConfig())
    assert outcome.status == "pass" and outcome.codes == ["no_reference"] and outcome.metrics["tflops_fp64"] > 0


def test_memtest_counts_every_bad_word() -> None:
    clean = numerics.memtest(np, nosync, 1 << 16, passes=2)
    assert clean["bad_words"] == 0 and clean["tested_bytes"] == 4 << 16

    def bad_word(buffer: np.ndarray, _pattern: str) -> None:
        buffer[12345] ^= np.uint32(1 << 7)

    faulty = numerics.memtest(np, nosync, 1 << 16, passes=2, corrupt=bad_word)
    assert faulty["bad_words"] == 2 * len(numerics.PATTERNS)
    outcome = judge("memtest", H200, {"device": "NVIDIA H200", "result": faulty}, GpuComputeConfig())
    assert outcome.status == "fail" and outcome.codes == ["memtest_bad_words"]
    assert outcome.metrics["bad_words"] == 6


def test_memtest_patterns_hold_what_they_promise() -> None:
    index = np.arange(64, dtype=np.uint64)
    walking = numerics.PATTERNS["walking_ones"](np, index, 3, 0)
    assert all(bin(int(w)).count("1") == 1 for w in walking) and int(walking[0]) == 1 << 3
    address = numerics.PATTERNS["address"](np, index, 0, 0)
    assert list(address) == list(range(64))
    assert list(numerics.PATTERNS["address"](np, index, 1, 0)) == [0xFFFFFFFF - i for i in range(64)]
    assert np.array_equal(numerics.PATTERNS["random"](np, index, 0, 7), numerics.PATTERNS["random"](np, index, 0, 7))
    assert not np.array_equal(numerics.PATTERNS["random"](np, index, 0, 7), numerics.PATTERNS["random"](np, index, 0, 8))


def test_bandwidth_is_counted_as_stream_counts_it() -> None:
    assert numerics.gbps(3e9, 1.0) == 3.0
    result = numerics.stream(np, nosync, 1 << 20, 2)
    assert result["triad_ok"] == 1.0 and result["array_bytes"] == 1 << 20
    assert result["copy_gbps"] > 0 and result["triad_gbps"] > 0


def test_nccl_tests_busbw_definition_and_size_sweep() -> None:
    assert numerics.busbw_factor(8) == pytest.approx(1.75) and numerics.busbw_factor(2) == 1.0
    assert numerics.busbw_factor(1) == 0.0  # nccl-tests: one rank moves nothing over a bus
    sweep = numerics.size_sweep(1 << 20, 1 << 30)
    assert sweep[0] == 1 << 20 and sweep[-1] == 1 << 30 and len(sweep) == 11


def test_pcie_is_judged_against_the_link() -> None:
    result = {"device": "NVIDIA B300", "result": {"h2d_gbps": 30.0, "d2h_gbps": 50.0, "copy_bytes": 1.0}}
    gen5 = Target(entity="gpu0", index=0, name="NVIDIA B300", pcie_gen_max=5, pcie_width_max=16)
    outcome = judge("pcie", gen5, result, GpuComputeConfig())
    assert outcome.status == "warn" and outcome.codes == ["pcie_slow"]  # 30 < 0.7 × 63 but > half of it
    gen4 = Target(entity="gpu0", index=0, name="NVIDIA B300", pcie_gen_max=4, pcie_width_max=16)
    assert judge("pcie", gen4, result, GpuComputeConfig()).status == "pass"
