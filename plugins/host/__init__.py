"""``host``: checks every node can run, GPU or not (psutil and the file system).

Checks (all in profiles ``prolog``, ``periodic`` and ``full``):

* ``host_memory``: available memory as a fraction of total; below the fail
  threshold it fails a prolog but only warns in the daemon (a job may be
  using the memory) unless ``memory_fail_in_periodic``.
* ``host_disk``: free space on each of ``disk_paths`` (one entity per path).
* ``host_paths``: every ``required_paths`` entry exists and every
  ``required_mounts`` entry is a mount point (a missing Lustre mount is a
  classic cause of jobs dying at start).
* ``host_env``: ``required_env`` variables are set, with the expected value
  unless that is ``""`` (CSCS vetnode's ``EnvVarEval``: ``NCCL_NET``,
  ``FI_PROVIDER``… on Alps). Under ``vetd check`` in a prolog this is the
  job's environment; the daemon checks ``env_file`` (the environment jobs
  get) and without one reports ``skip`` (``no_job_env``): systemd's
  environment is not a job's.
* ``host_load``: 1-minute load average per logical CPU.

Telemetry source ``host``: CPU and memory use, load, network byte counters.

Configured in ``[plugins.host]``; every threshold has a default and can be
switched off with 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from vetd.agent.api import AgentCommand, Answer, Check, TelemetrySource, fill, hookimpl
from vetd.plugins.host.checks import (
    check_disk,
    check_env,
    check_load,
    check_memory,
    check_paths,
    node_labels,
    sample_host,
)
from vetd.plugins.host.config import HostConfig

if TYPE_CHECKING:
    from vetd.agent.api import (
        CheckRegistry,
        CommandContext,
        CommandRegistry,
        PluginConfigs,
        TelemetryRegistry,
    )

PROFILES = frozenset({"prolog", "periodic", "full"})


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"host": HostConfig}


@hookimpl
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    config = configs.typed("host", HostConfig)
    timeout = float(config.timeout)
    registry.add(Check("host_memory", lambda: check_memory(config), timeout, profiles=PROFILES,
                       description="available memory fraction"))
    registry.add(Check("host_disk", lambda: check_disk(config), timeout, profiles=PROFILES,
                       description="free disk space on disk_paths"))
    registry.add(Check("host_paths", lambda: check_paths(config), timeout, profiles=PROFILES,
                       description="required paths exist and mounts are mounted"))
    registry.add(Check("host_env", lambda: check_env(config), timeout, profiles=PROFILES,
                       description="required environment variables"))
    registry.add(Check("host_load", lambda: check_load(config), timeout, profiles=PROFILES,
                       description="load average per CPU"))


@hookimpl
def vetd_register_telemetry(registry: TelemetryRegistry, configs: PluginConfigs) -> None:
    if configs.typed("host", HostConfig).telemetry:
        registry.add(TelemetrySource("host", sample_host))


@hookimpl
def vetd_node_labels() -> Mapping[str, str]:
    return node_labels()


@hookimpl
def vetd_register_commands(registry: CommandRegistry) -> None:
    registry.add(AgentCommand("restart_service", restart_service, description="restart a service listed in "
                              "[commands] services with [commands] restart_service"))


async def restart_service(args: Mapping[str, str], context: CommandContext) -> Answer:
    """``[commands] restart_service`` (``systemctl restart {service}``) for a service in ``[commands] services``."""
    service = args.get("service", "")
    if service not in context.config.services:
        return Answer(False, f"refused: service {service!r} is not in [commands] services", {})
    return await context.run(fill(context.config.restart_service, service=service))
