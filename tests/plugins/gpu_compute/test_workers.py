"""Worker isolation with real processes: `vetd check` starts real workers, and kills or buries them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.procs import run_vetd, vetd_env


def check(tmp_path: Path, *args: str, inject: str = "", config: str = "") -> tuple[int, dict[str, dict], float]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config)
    env = vetd_env(VETD_LOG_LEVEL="warning", VETD_CONFIG=str(cfg))
    if inject:
        env["VETD_GPU_COMPUTE_INJECT"] = inject
    started = time.monotonic()
    done = run_vetd("check", "--array-backend", "numpy", "--json", *args, env=env, timeout=120)
    assert done.returncode in (0, 1, 2), done.stderr
    results = {r["check"]: r for r in map(json.loads, done.stdout.splitlines())}
    return done.returncode, results, time.monotonic() - started


def test_the_numpy_backend_runs_the_real_numerics_through_a_worker(tmp_path: Path) -> None:
    rc, results, _ = check(tmp_path, "gpu_gemm", "gpu_memtest")
    assert rc == 0
    gemm, memtest = results["gpu_gemm"], results["gpu_memtest"]
    assert gemm["status"] == "pass" and gemm["entity"] == "cpu" and gemm["codes"] == ["cpu_backend"]
    assert gemm["metrics"]["tflops_fp64"] > 0 and gemm["metrics"]["checksum_error_fp16"] < 1e-4
    assert memtest["status"] == "pass" and memtest["metrics"]["bad_words"] == 0


@pytest.mark.parametrize(("inject", "name", "code"), [("gemm_bitflip", "gpu_gemm", "gemm_wrong"),
                                                      ("memtest_badword", "gpu_memtest", "memtest_bad_words")])
def test_an_injected_fault_fails_the_check(tmp_path: Path, inject: str, name: str, code: str) -> None:
    rc, results, _ = check(tmp_path, name, inject=inject)
    assert rc == 1 and results[name]["status"] == "fail" and results[name]["codes"] == [code]


def test_a_hanging_worker_is_killed_at_its_deadline_and_the_other_checks_go_on(tmp_path: Path) -> None:
    rc, results, took = check(tmp_path, "gpu_gemm", "gpu_memtest", "host_memory", inject="hang",
                              config='[plugins.gpu_compute]\ntimeout_prolog = "2s"\n')
    assert rc == 2 and took < 30  # timeouts are vetd's own failure: no drain
    assert results["gpu_gemm"]["status"] == "timeout" and results["gpu_gemm"]["codes"] == ["worker_timeout"]
    assert results["gpu_memtest"]["status"] == "timeout"
    assert results["host_memory"]["status"] in ("pass", "warn")


def test_a_worker_that_aborts_is_an_error_never_a_pass(tmp_path: Path) -> None:
    rc, results, _ = check(tmp_path, "gpu_gemm", "host_memory", inject="abort")
    assert rc == 2  # a crashed worker is an error: vetd's failure, not the node's
    assert results["gpu_gemm"]["status"] == "error" and results["gpu_gemm"]["codes"] == ["worker_crashed"]
    assert "SIGABRT" in results["gpu_gemm"]["message"]
    assert results["host_memory"]["status"] in ("pass", "warn")


def test_a_test_that_raises_is_an_error(tmp_path: Path) -> None:
    rc, results, _ = check(tmp_path, "gpu_memory_bandwidth", inject="raise")
    assert rc == 2 and results["gpu_memory_bandwidth"]["status"] == "error"
    assert "injected failure" in results["gpu_memory_bandwidth"]["message"]


def test_without_cupy_every_compute_check_skips_with_no_cuda(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    done = run_vetd("check", "gpu_gemm", "gpu_memory_bandwidth", "gpu_memtest", "gpu_pcie_bandwidth",
                    "nccl_allreduce", "--json", env=vetd_env(VETD_CONFIG=str(cfg), VETD_LOG_LEVEL="warning"))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 5 and all(r["status"] == "skip" and r["codes"] == ["no_cuda"] for r in results)
