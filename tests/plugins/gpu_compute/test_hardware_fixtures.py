"""What one real H200 measured (tests/data/gpu_compute/), held against the shipped SKU table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vetd.plugins.gpu_compute.skus import lookup

DATA = Path(__file__).resolve().parents[2] / "data" / "gpu_compute"
CHECKS = {"gpu_gemm", "gpu_memory_bandwidth", "gpu_memtest", "gpu_pcie_bandwidth"}


def results(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["h200.prolog.json", "h200.full.json"])
def test_a_healthy_h200_clears_every_shipped_floor(name: str) -> None:
    sku = lookup("NVIDIA H200")
    assert sku is not None and sku.floor
    measured = {key: value for result in results(name) if result["check"] in CHECKS
                for key, value in result["metrics"].items()}
    judged = {metric: (measured[metric], floor) for metric, floor in sku.floor.items() if metric in measured}
    assert {"tflops_fp64", "tflops_fp32", "tflops_fp16", "copy_gbps"} <= judged.keys()
    below = {metric: pair for metric, pair in judged.items() if pair[0] < pair[1]}
    assert not below, f"floors above what a healthy H200 measured (metric: (measured, floor)): {below}"
    for result in results(name):
        if result["check"] in CHECKS:
            assert result["status"] == "pass", result


def test_the_measurements_sit_below_the_published_peaks() -> None:
    """A figure above the datasheet peak means the arithmetic (bytes or flops counted) is wrong."""
    sku = lookup("NVIDIA H200")
    assert sku is not None
    metrics = {key: value for result in results("h200.full.json") for key, value in result["metrics"].items()}
    for dtype in ("fp64", "fp32", "fp16"):
        assert 0.3 * sku.peak[f"tflops_{dtype}"] < metrics[f"tflops_{dtype}"] <= sku.peak[f"tflops_{dtype}"]
    assert 0.5 * sku.peak["mem_gbps"] < metrics["triad_gbps"] <= sku.peak["mem_gbps"]
    assert metrics["bad_words"] == 0 and metrics["tested_gib"] > 50  # full: most of the 141 GB


def test_injected_faults_were_caught_on_the_gpu() -> None:
    by_check = {(r["check"], r["status"]): r for r in results("h200.inject.json")}
    gemm = by_check[("gpu_gemm", "fail")]
    assert "gemm_wrong" in gemm["codes"]
    assert all(gemm["metrics"][f"checksum_error_{d}"] > 1e-6 for d in ("fp64", "fp32", "fp16"))
    memtest = by_check[("gpu_memtest", "fail")]
    assert memtest["metrics"]["bad_words"] > 0
    crashed = by_check[("gpu_gemm", "error")]
    assert "SIGABRT" in crashed["message"]


def test_prolog_wall_time_on_one_gpu() -> None:
    bench = json.loads((DATA / "h200.bench.json").read_text())
    assert bench["prolog"]["rc"] == 0
    assert bench["prolog"]["wall_s"] < 10.0  # CSCS's prolog timeout


def test_one_rank_publishes_no_busbw() -> None:
    """busbw is 0 by definition with one rank (the H200 run above): not a figure a peer rule may compare."""
    from vetd.plugins.nccl import judge
    from vetd.plugins.nccl.config import NcclConfig

    sizes = [{"bytes": 1 << 20, "algbw_gbps": 171.3, "busbw_gbps": 0.0},
             {"bytes": 1 << 30, "algbw_gbps": 2127.9, "busbw_gbps": 0.0}]
    outcome = judge({"result": {"ranks": 1, "sizes": sizes, "wrong_elements": 0}}, NcclConfig(), "NVIDIA H200")
    assert outcome.status == "pass" and "single_rank" in outcome.codes
    assert not any(key.startswith("busbw") for key in outcome.metrics)
    assert outcome.metrics["algbw_gbps"] == 2127.9 and outcome.metrics["algbw_gbps_1g"] == 2127.9
