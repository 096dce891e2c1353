"""`vetd check --protocol FILE`: vetd's protocol format and vetnode's."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.procs import REPO, run_vetd, vetd_env


def protocol(tmp_path: Path, text: str, *extra: str) -> tuple[int, list[dict], str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    path = tmp_path / "protocol.yaml"
    path.write_text(text)
    done = run_vetd("check", "--array-backend", "numpy", "--protocol", str(path), "--json", *extra,
                    env=vetd_env(VETD_CONFIG=str(cfg), VETD_LOG_LEVEL="warning"))
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_a_vetd_protocol_runs_its_checks_with_its_parameters(tmp_path: Path) -> None:
    rc, results, err = protocol(tmp_path, "name: t\nprofile: prolog\nchecks:\n  - host_memory\n"
                                "  - gpu_gemm:\n      gemm_dtypes: [fp64]\n")
    assert rc == 0, err
    assert [r["check"] for r in results] == ["host_memory", "gpu_gemm"]
    assert set(results[1]["metrics"]) == {"tflops_fp64", "checksum_error_fp64"}  # the parameter took
    assert {r["profile"] for r in results} == {"prolog"}


def test_a_bad_parameter_names_file_line_and_key(tmp_path: Path) -> None:
    rc, _, err = protocol(tmp_path, "name: t\nchecks:\n  - gpu_gemm:\n      gemm_n_prolog: 1\n")
    assert rc == 2 and "protocol.yaml:4: gemm_n_prolog" in err and err.count("\n") == 1


def test_an_unknown_check_names_its_line(tmp_path: Path) -> None:
    rc, _, err = protocol(tmp_path, "checks:\n  - host_memory\n  - gpu_nonsense\n")
    assert rc == 2 and "protocol.yaml:3: no check named 'gpu_nonsense'" in err


def test_a_vetnode_config_maps_onto_vetd_checks(tmp_path: Path) -> None:
    text = (REPO / "packaging" / "protocols" / "vetnode-ml.yaml").read_text()
    rc, results, err = protocol(tmp_path, text)
    assert rc == 0, err
    assert [r["check"] for r in results] == ["gpu_gemm", "gpu_idle", "nccl_allreduce"]


def test_a_vetnode_eval_type_vetd_cannot_map_exits_2_naming_file_line_and_type(tmp_path: Path) -> None:
    rc, results, err = protocol(tmp_path, "name: x\nevals:\n- name: Check GPU\n  type: vetnode.evaluations.gpu_eval.GPUEval\n"
                                "- name: Pinger\n  type: vetnode.evaluations.ping.PingEval\n")
    assert rc == 2 and results == []
    assert err.strip().count("\n") == 0
    assert "protocol.yaml:6:" in err and "vetnode.evaluations.ping.PingEval" in err


def test_vetnode_parameters_are_validated_too(tmp_path: Path) -> None:
    rc, _, err = protocol(tmp_path, "evals:\n- name: g\n  type: GPUEval\n  max_used_memory: 256\n")
    assert rc == 2 and "protocol.yaml:4: max_used_memory" in err
    rc, _, err = protocol(tmp_path, "evals:\n- name: n\n  type: NCCLEval\n  min_bandwidth: fast\n")
    assert rc == 2 and "protocol.yaml:4: min_bandwidth" in err


def test_the_shipped_vetd_example_dry_runs_on_numpy(tmp_path: Path) -> None:
    rc, results, err = protocol(tmp_path, (REPO / "packaging" / "protocols" / "prolog-gpu.yaml").read_text())
    assert rc == 0, err
    assert {r["check"] for r in results} >= {"gpu_gemm", "gpu_memtest", "nccl_allreduce", "gpu_idle"}
