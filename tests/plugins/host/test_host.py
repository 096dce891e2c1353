from __future__ import annotations

from pathlib import Path

from vetd.plugins.host.checks import (
    check_disk,
    check_env,
    check_load,
    check_memory,
    check_paths,
)
from vetd.plugins.host.config import HostConfig


def test_required_paths_and_mounts(tmp_path: Path) -> None:
    ok = check_paths(HostConfig(required_paths=[str(tmp_path)], required_mounts=["/"]))
    assert (ok.status, ok.codes) == ("pass", [])
    bad = check_paths(HostConfig(required_paths=[str(tmp_path / "x")], required_mounts=[str(tmp_path)]))
    assert bad.status == "fail"
    assert bad.codes == ["path_missing", "mount_missing"]
    assert bad.metrics["paths_missing"] == 2.0


def test_required_env_expected_values_and_presence() -> None:
    config = HostConfig(required_env={"NCCL_NET": "AWS Libfabric", "FI_PROVIDER": "", "MISSING": ""})
    outcome = check_env(config, {"NCCL_NET": "Socket", "FI_PROVIDER": "cxi"})
    assert outcome.status == "fail"
    assert outcome.codes == ["env_missing", "env_mismatch"]
    assert "unset: MISSING" in outcome.message and "NCCL_NET='Socket'" in outcome.message
    good = check_env(config, {"NCCL_NET": "AWS Libfabric", "FI_PROVIDER": "cxi", "MISSING": "x"})
    assert good.status == "pass"


def test_thresholds_come_from_config() -> None:
    assert check_memory(HostConfig(memory_fail_fraction=1.01, memory_warn_fraction=0)).status == "fail"
    assert check_memory(HostConfig(memory_fail_fraction=0, memory_warn_fraction=1.01)).status == "warn"
    assert check_memory(HostConfig(memory_fail_fraction=0, memory_warn_fraction=0)).status == "pass"
    load = check_load(HostConfig(load_warn_per_core=0, load_fail_per_core=0))
    assert load.status == "pass" and load.metrics["cpus"] >= 1 and "load_per_core" in load.metrics
    disk = check_disk(HostConfig(disk_paths=["/", "/no/such/disk"], disk_fail_gib=0, disk_warn_fraction=0,
                                 disk_fail_fraction=0))
    assert [(o.entity, o.status) for o in disk] == [("disk:/", "pass"), ("disk:/no/such/disk", "fail")]
    assert disk[0].metrics["disk_total_bytes"] > 0
