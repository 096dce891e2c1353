"""`vetd check` as an operator or a Slurm prolog runs it: a real process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import run_vetd, vetd_env


def test_all_pass_exits_0_with_a_table(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[plugins.host]\nrequired_paths = ["{tmp_path}"]\nload_warn_per_core = 0.0\n')
    done = run_vetd("check", "--config", str(config), "host_paths", "host_memory")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "ENTITY", "STATUS", "DURATION", "MESSAGE"]
    assert {line.split()[0] for line in lines[1:]} == {"host_paths", "host_memory"}
    assert all(line.split()[2] == "PASS" for line in lines[1:])


def test_a_failing_check_exits_1_and_json_carries_codes(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[plugins.host]\nrequired_paths = ["/no/such/scratch"]\n'
        'required_env = { NCCL_NET = "AWS Libfabric", VETD_TEST_SET = "" }\n'
    )
    env = vetd_env(NCCL_NET="Socket", VETD_TEST_SET="1")
    done = run_vetd("check", "--config", str(config), "--json", "host_paths", "host_env", env=env)
    assert done.returncode == 1, done.stderr
    results = {r["check"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert results["host_paths"]["status"] == "fail"
    assert results["host_paths"]["codes"] == ["path_missing"]
    assert "/no/such/scratch" in results["host_paths"]["message"]
    assert results["host_env"]["codes"] == ["env_mismatch"]
    assert "NCCL_NET='Socket'" in results["host_env"]["message"]
    assert set(results["host_env"]) >= {"check", "entity", "status", "codes", "metrics", "message"}


def test_vetd_itself_failing_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nbogus = true\n")
    done = run_vetd("check", "--config", str(config))
    assert done.returncode == 2
    assert f"{config}:2: agent.bogus" in done.stderr
    unknown = run_vetd("check", "--config", "/dev/null", "no_such_check")
    assert unknown.returncode == 2
    assert "unknown check(s): no_such_check" in unknown.stderr


def test_profile_selects_and_a_raising_plugin_check_exits_2(tmp_path: Path) -> None:
    """A check that raised or hung is vetd's failure, not the node's: exit 2, which the prolog
    logs without draining (exit 1 is a node fault only)."""
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nload_plugins = ["vetd_testplugin"]\n')
    done = run_vetd("check", "--config", str(config), "--json", "--profile", "periodic")
    assert done.returncode == 2
    statuses = {r["check"]: r["status"] for r in map(json.loads, done.stdout.splitlines())}
    assert statuses["raises"] == "error"
    assert statuses["hangs"] == "timeout"
    assert statuses["steady"] == "pass"
    prolog = run_vetd("check", "--config", str(config), "--json", "--profile", "prolog")
    assert "raises" not in prolog.stdout and "host_memory" in prolog.stdout


def test_check_overrides_disable_and_time_out_checks(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nload_plugins = ["vetd_testplugin"]\n'
                      '[checks.raises]\nenabled = false\n[checks.hangs]\ntimeout = "100ms"\n')
    done = run_vetd("check", "--config", str(config), "--json", "--profile", "periodic")
    results = {r["check"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert "raises" not in results  # disabled
    assert results["hangs"]["status"] == "timeout" and results["hangs"]["metrics"]["timeout_s"] == 0.1
    named = run_vetd("check", "--config", str(config), "--json", "raises")  # named explicitly: runs anyway
    assert json.loads(named.stdout)["status"] == "error"


def test_non_finite_metrics_stay_valid_json(tmp_path: Path) -> None:
    plugin = tmp_path / "nanplugin.py"
    plugin.write_text(
        "from vetd.agent.checks import Check, Outcome\nfrom vetd.agent.api import hookimpl\n\n"
        "@hookimpl\ndef vetd_register_checks(registry, configs):\n"
        "    registry.add(Check('odd', lambda: Outcome(status='pass', metrics={'a': float('nan'), "
        "'b': float('inf'), 'c': 1.5})))\n")
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nload_plugins = ["nanplugin"]\n')
    env = vetd_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    done = run_vetd("check", "--config", str(config), "--json", "odd", env=env)
    assert json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))["metrics"] == {
        "a": None, "b": None, "c": 1.5}
