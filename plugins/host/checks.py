"""The host checks and telemetry: what each reads (psutil, the file system) and how it judges."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import psutil

from vetd.agent.api import Outcome, Status, current_profile
from vetd.plugins.host.config import HostConfig

GIB = 1024**3


def _fraction_status(value: float, warn: float, fail: float) -> Status:
    if fail and value < fail:
        return "fail"
    if warn and value < warn:
        return "warn"
    return "pass"


def check_memory(config: HostConfig, profile: str | None = None) -> Outcome:
    memory = psutil.virtual_memory()
    fraction = memory.available / memory.total if memory.total else 0.0
    status = _fraction_status(fraction, config.memory_warn_fraction, config.memory_fail_fraction)
    periodic = (current_profile() if profile is None else profile) == "periodic"
    if status == "fail" and periodic and not config.memory_fail_in_periodic:
        status = "warn"  # a job may be using it: warn the operator, never drain the job's node for it
    return Outcome(
        status=status,
        codes=[] if status == "pass" else ["memory_low"],
        metrics={
            "mem_available_bytes": float(memory.available),
            "mem_total_bytes": float(memory.total),
            "mem_available_fraction": round(fraction, 4),
        },
        message=f"{fraction:.1%} of {memory.total / GIB:.1f} GiB available",
    )


def check_disk(config: HostConfig) -> list[Outcome]:
    outcomes = []
    for path in config.disk_paths:
        entity = f"disk:{path}"
        try:
            usage = psutil.disk_usage(path)
        except OSError as exc:
            outcomes.append(
                Outcome(status="fail", entity=entity, codes=["path_missing"], message=str(exc))
            )
            continue
        fraction = usage.free / usage.total if usage.total else 0.0
        status = _fraction_status(fraction, config.disk_warn_fraction, config.disk_fail_fraction)
        if config.disk_fail_gib and usage.free < config.disk_fail_gib * GIB:
            status = "fail"
        outcomes.append(
            Outcome(
                status=status,
                entity=entity,
                codes=[] if status == "pass" else ["disk_low"],
                metrics={
                    "disk_free_bytes": float(usage.free),
                    "disk_total_bytes": float(usage.total),
                    "disk_free_fraction": round(fraction, 4),
                },
                message=f"{usage.free / GIB:.1f} GiB ({fraction:.1%}) free on {path}",
            )
        )
    return outcomes


def check_paths(config: HostConfig) -> Outcome:
    missing = [path for path in config.required_paths if not Path(path).exists()]
    unmounted = [path for path in config.required_mounts if not os.path.ismount(path)]
    codes = (["path_missing"] if missing else []) + (["mount_missing"] if unmounted else [])
    problems = [f"missing: {', '.join(missing)}"] if missing else []
    problems += [f"not mounted: {', '.join(unmounted)}"] if unmounted else []
    wanted = len(config.required_paths) + len(config.required_mounts)
    return Outcome(
        status="fail" if codes else "pass",
        codes=codes,
        metrics={"paths_missing": float(len(missing) + len(unmounted))},
        message="; ".join(problems) if problems else f"all {wanted} required paths present",
    )


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a shell-style environment file (``export``, quotes, ``#`` comments)."""
    env: dict[str, str] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def check_env(config: HostConfig, environ: Mapping[str, str] | None = None, profile: str | None = None) -> Outcome:
    if environ is not None:
        env: Mapping[str, str] = environ
    elif config.env_file:
        try:
            env = read_env_file(config.env_file)
        except OSError as exc:
            return Outcome(status="error", codes=["env_file_unreadable"],
                           message=f"env_file {config.env_file}: {exc.strerror or exc}")
    elif config.required_env and (current_profile() if profile is None else profile) == "periodic":
        return Outcome(status="skip", codes=["no_job_env"],
                       message="the agent's own environment is not a job's: set [plugins.host] env_file "
                               "to check the variables jobs get (a prolog checks the job's own)")
    else:
        env = os.environ
    missing = [name for name in config.required_env if name not in env]
    wrong = [
        f"{name}={env[name]!r} (expected {expected!r})"
        for name, expected in config.required_env.items()
        if expected and name in env and env[name] != expected
    ]
    codes = (["env_missing"] if missing else []) + (["env_mismatch"] if wrong else [])
    problems = ([f"unset: {', '.join(missing)}"] if missing else []) + wrong
    return Outcome(
        status="fail" if codes else "pass",
        codes=codes,
        metrics={"env_bad": float(len(missing) + len(wrong))},
        message="; ".join(problems) if problems else f"all {len(config.required_env)} variables as expected",
    )


def check_load(config: HostConfig) -> Outcome:
    load1, _, _ = os.getloadavg()
    cores = psutil.cpu_count() or 1
    per_core = load1 / cores
    status: Status = "pass"
    if config.load_fail_per_core and per_core >= config.load_fail_per_core:
        status = "fail"
    elif config.load_warn_per_core and per_core >= config.load_warn_per_core:
        status = "warn"
    return Outcome(
        status=status,
        codes=[] if status == "pass" else ["load_high"],
        metrics={"load1": round(load1, 3), "load_per_core": round(per_core, 3), "cpus": float(cores)},
        message=f"load {load1:.2f} on {cores} CPUs",
    )


def sample_host() -> dict[str, dict[str, float]]:
    memory = psutil.virtual_memory()
    net = psutil.net_io_counters()
    load1, load5, _ = os.getloadavg()
    return {
        "node": {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_used_fraction": round(1 - memory.available / memory.total, 4),
            "load1": load1,
            "load5": load5,
            "net_bytes_sent": float(net.bytes_sent),
            "net_bytes_recv": float(net.bytes_recv),
        }
    }


def node_labels() -> dict[str, str]:
    return {"cpus": str(psutil.cpu_count() or 0), "mem_gib": str(round(psutil.virtual_memory().total / GIB))}
