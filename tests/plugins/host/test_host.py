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
    assert check_memory(HostConfig(memory_fail_fraction=1.01, memory_warn_fraction=0), "prolog").status == "fail"
    assert check_memory(HostConfig(memory_fail_fraction=0, memory_warn_fraction=1.01)).status == "warn"
    assert check_memory(HostConfig(memory_fail_fraction=0, memory_warn_fraction=0)).status == "pass"
    load = check_load(HostConfig(load_warn_per_core=0, load_fail_per_core=0))
    assert load.status == "pass" and load.metrics["cpus"] >= 1 and "load_per_core" in load.metrics
    disk = check_disk(HostConfig(disk_paths=["/", "/no/such/disk"], disk_fail_gib=0, disk_warn_fraction=0,
                                 disk_fail_fraction=0))
    assert [(o.entity, o.status) for o in disk] == [("disk:/", "pass"), ("disk:/no/such/disk", "fail")]
    assert disk[0].metrics["disk_total_bytes"] > 0


def test_low_memory_fails_a_prolog_but_only_warns_while_a_job_may_run() -> None:
    """Issue 14: host memory below 5 % drained nodes mid-job, killing the job it was measuring."""
    low = HostConfig(memory_fail_fraction=1.0, memory_warn_fraction=1.0)
    assert check_memory(low, "prolog").status == "fail"
    assert check_memory(low, "full").status == "fail"
    periodic = check_memory(low, "periodic")
    assert (periodic.status, periodic.codes) == ("warn", ["memory_low"])
    strict = HostConfig(memory_fail_fraction=1.0, memory_warn_fraction=1.0, memory_fail_in_periodic=True)
    assert check_memory(strict, "periodic").status == "fail"


def test_the_daemon_does_not_judge_job_variables_by_its_own_environment(tmp_path: Path) -> None:
    """Issue 14: host_env read the service's environment, which has none of a job's variables."""
    config = HostConfig(required_env={"NCCL_NET": "AWS Libfabric", "FI_PROVIDER": ""})
    skipped = check_env(config, profile="periodic")
    assert (skipped.status, skipped.codes) == ("skip", ["no_job_env"])
    assert check_env(HostConfig(), profile="periodic").status == "pass"  # nothing required: nothing to judge
    env_file = tmp_path / "job.env"
    env_file.write_text('# what jobs get\nexport NCCL_NET="AWS Libfabric"\nFI_PROVIDER=cxi\n\nnot a line\n')
    with_file = HostConfig(required_env=config.required_env, env_file=str(env_file))
    assert check_env(with_file, profile="periodic").status == "pass"
    env_file.write_text("NCCL_NET=Socket\n")
    bad = check_env(with_file, profile="periodic")
    assert bad.status == "fail" and bad.codes == ["env_missing", "env_mismatch"]
    missing = check_env(HostConfig(required_env={"A": ""}, env_file=str(tmp_path / "none")), profile="periodic")
    assert (missing.status, missing.codes) == ("error", ["env_file_unreadable"])
    # a prolog (or a person's `vetd check`) checks the environment it runs in
    assert check_env(config, {"NCCL_NET": "AWS Libfabric", "FI_PROVIDER": "cxi"}, profile="prolog").status == "pass"
