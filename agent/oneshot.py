"""``vetd check``: run checks once on this node, no broker needed.

The Slurm prolog and sbatch-preflight entry point. Exit status as every
command's (:mod:`vetd.core.cli`): 1 only for a node fault, so the prolog drains
on nothing else.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Sequence
from typing import TextIO

import msgspec

from vetd.agent.checks import PROFILE, Check, CheckRun, CheckRunner
from vetd.agent.config import AgentConfig
from vetd.agent.pluginhost import PluginHost
from vetd.core.cli import EXIT_FAILED, EXIT_OK, EXIT_VETD
from vetd.core.output import table


class SelectionError(Exception):
    pass


def select(config: AgentConfig, host: PluginHost, names: Sequence[str], profile: str | None) -> list[Check]:
    """Checks named, else those of ``profile``, else all enabled ones."""
    registry = host.register_checks()
    if names:
        unknown = [name for name in names if name not in registry]
        if unknown:
            raise SelectionError(
                f"unknown check(s): {', '.join(unknown)}; available: {', '.join(registry.names())}"
            )
        return [check for name in names if (check := registry.get(name)) is not None]
    if profile:
        chosen = config.profile_checks(profile, registry)
    else:
        chosen = [check for check in registry
                  if (override := config.checks.get(check.name)) is None or override.enabled]
    if not chosen:
        raise SelectionError(f"no checks in profile {profile!r}" if profile else "no checks registered")
    return chosen


async def run_checks(config: AgentConfig, checks: Sequence[Check]) -> list[CheckRun]:
    runner = CheckRunner()

    def timeout_of(check: Check) -> float:
        override = config.checks.get(check.name)
        return float(override.timeout) if override is not None and override.timeout else check.timeout

    return list(await asyncio.gather(*(runner.run(check, timeout_of(check)) for check in checks)))


def rows(runs: Sequence[CheckRun], profile: str | None) -> list[dict[str, object]]:
    return [
        {
            "check": run.check.name,
            "entity": outcome.entity,
            "status": outcome.status,
            "codes": list(outcome.codes),
            # JSON has no NaN or infinity: such a value is reported as null.
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in outcome.metrics.items()},
            "message": outcome.message,
            "duration_s": round(run.duration_s, 4),
            "profile": profile or "",
            "plugin": run.check.plugin,
            "ts": run.started,
        }
        for run in runs
        for outcome in run.outcomes
    ]


async def collect(config: AgentConfig, host: PluginHost, checks: Sequence[Check],
                  profile: str | None) -> list[dict[str, object]]:
    """Run ``checks`` (from :func:`select`) once: one row per result, and an ``error`` row per broken plugin."""
    token = PROFILE.set(profile or "")
    try:
        runs = await run_checks(config, checks)
    finally:
        PROFILE.reset(token)
    results = rows(runs, profile)
    for plugin, error in host.broken.items():
        results.append({"check": "plugin_load", "entity": plugin, "status": "error",
                        "codes": ["plugin_broken"], "metrics": {}, "message": error,
                        "duration_s": 0.0, "profile": profile or "", "plugin": plugin, "ts": 0.0})
    return results


def print_table(results: Sequence[dict[str, object]], out: TextIO) -> None:
    out.write(table(("CHECK", "ENTITY", "STATUS", "DURATION", "MESSAGE"),
                    [(str(r["check"]), str(r["entity"]), str(r["status"]).upper(), f"{r['duration_s']:.3f}s",
                      str(r["message"])) for r in results]))


def main(
    config: AgentConfig,
    names: Sequence[str],
    profile: str | None,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    host = PluginHost(config)
    checks = select(config, host, names, profile)  # before the loop: a bad name is one line, no log
    results = asyncio.run(collect(config, host, checks, profile))
    if as_json:
        out.writelines(json.dumps(result, default=_json_default) + "\n" for result in results)
    else:
        print_table(results, out)
    statuses = {r["status"] for r in results}
    if "fail" in statuses:
        return EXIT_FAILED
    return EXIT_VETD if statuses & {"error", "timeout"} else EXIT_OK


def _json_default(value: object) -> object:
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    raise TypeError(type(value).__name__)
