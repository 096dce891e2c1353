"""``gpu_health``: NVIDIA GPU health checks, XID events and GPU telemetry.

Checks:

* ``gpu_health`` (profiles ``prolog``, ``periodic``, ``full``): one result for
  the node (GPU count against the expected count, driver version as metrics)
  and one per GPU (``gpu0``…): ECC, retired pages / row remapping, the driver's
  reset-required / drain-and-reset / recovery-action verdicts, clock slowdown
  reasons, temperature margin, PCIe link and replays, NVLink state and
  errors, persistence mode.
* ``gpu_idle`` (profile ``prolog``): before a job, every GPU is cool, its
  memory is free and no compute process is left on it (CSCS vetnode's limits).

Event sources ``gpu_xid`` (NVML event set) and ``gpu_kmsg`` (XID, "fallen off
the bus" and NVSwitch SXid lines in ``/dev/kmsg``) publish an ``xid`` (or
``sxid``) event the moment it happens, with the severity and resolution of
NVIDIA's XID catalog (:mod:`~vetd.plugins.gpu_health.catalog`) and the site's
``xid_severity`` over it; the same XID from both is reported once. The NVML event set also delivers the other health events a
GPU supports (GPU unavailable, poison, row-remap failure, recovery action...),
published as ``gpu_event`` with a severity from ``event_severity``. A warning
or critical event runs ``gpu_health`` at once.

Command line: ``vetd xid FILE|-`` decodes a kernel log offline
(:mod:`~vetd.plugins.gpu_health.kernlog`); ``vetd nvml-sim reset|dcgm-exporter
SCENARIO`` are a simulated node's stand-ins for ``nvidia-smi -r`` and NVIDIA's
dcgm-exporter (:mod:`~vetd.plugins.gpu_health.dcgmsim`).

State comes from NVML (``source = "nvml"``), an ``nvidia-smi -q -x`` capture
(``source = "capture"``) or a scenario (``source = "scenario"``); see
:mod:`vetd.plugins.gpu_health.replay`. A node without NVIDIA GPUs reports ``skip``
(``not_applicable``) once; a node whose sysfs lists NVIDIA GPUs but whose
driver cannot be reached fails with ``driver_unavailable``.
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

# Only ``hookimpl`` at import: ``vetd`` imports this module for its commands (vetd xid, vetd nvml-sim)
# on every start, `vetd slurm prolog` included; the checks' machinery comes with the hooks that use it.
from vetd.agent.api import hookimpl

if TYPE_CHECKING:
    import msgspec

    from vetd.agent.api import (
        Answer,
        CheckRegistry,
        CommandContext,
        CommandRegistry,
        EventSourceRegistry,
        PluginConfigs,
        TelemetryRegistry,
    )
    from vetd.plugins.gpu_health.runtime import GpuRuntime

_runtimes: weakref.WeakKeyDictionary[PluginConfigs, GpuRuntime] = weakref.WeakKeyDictionary()


def runtime_for(configs: PluginConfigs) -> GpuRuntime:
    """The runtime of one config load, shared by this plugin's hooks."""
    from vetd.plugins.gpu_health.config import GpuHealthConfig
    from vetd.plugins.gpu_health.runtime import GpuRuntime

    runtime = _runtimes.get(configs)
    if runtime is None:
        runtime = _runtimes[configs] = GpuRuntime(configs.typed("gpu_health", GpuHealthConfig))
    return runtime


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    from vetd.plugins.gpu_health.config import GpuHealthConfig

    return {"gpu_health": GpuHealthConfig}


@hookimpl
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    from vetd.agent.api import Check
    from vetd.plugins.gpu_health.runtime import HEALTH_PROFILES, IDLE_PROFILES

    runtime = runtime_for(configs)
    timeout = float(runtime.config.check_timeout)
    registry.add(Check("gpu_health", runtime.health, timeout, profiles=HEALTH_PROFILES,
                       description="ECC, memory, reset flags, clocks, PCIe, NVLink, GPU count"))
    registry.add(Check("gpu_idle", runtime.idle, timeout, profiles=IDLE_PROFILES,
                       description="GPUs cool, memory free, no stray processes before a job"))


@hookimpl
def vetd_register_telemetry(registry: TelemetryRegistry, configs: PluginConfigs) -> None:
    from vetd.agent.api import TelemetrySource
    from vetd.plugins.gpu_health.sources import nvidia_gpus_in_sysfs

    runtime = runtime_for(configs)
    if runtime.config.telemetry and (runtime.config.source != "nvml" or nvidia_gpus_in_sysfs() > 0):
        registry.add(TelemetrySource("gpu", runtime.telemetry, timeout=float(runtime.config.driver_timeout)))


@hookimpl
def vetd_register_event_sources(registry: EventSourceRegistry, configs: PluginConfigs) -> None:
    from vetd.agent.api import EventSource

    runtime = runtime_for(configs)
    # After a warning or critical event, gpu_health runs at once: which GPU is
    # lost or needs a reset is known seconds after the XID, not an interval later.
    recheck = ("gpu_health",)
    registry.add(EventSource("gpu_xid", runtime.watch_driver, recheck=recheck))  # XIDs and the other NVML events
    if runtime.config.kmsg:
        registry.add(EventSource("gpu_kmsg", runtime.watch_kmsg, recheck=recheck))


@hookimpl
def vetd_register_commands(registry: CommandRegistry, configs: PluginConfigs) -> None:
    from vetd.agent.api import AgentCommand

    runtime = runtime_for(configs)

    async def gpu_reset(args: Mapping[str, str], context: CommandContext) -> Answer:
        return await reset_gpu(args, context, runtime)

    registry.add(AgentCommand("gpu_reset", gpu_reset, description="reset one GPU (gpu=INDEX) or every GPU "
                              "(gpu=all) with [commands] gpu_reset / gpu_reset_all"))


async def reset_gpu(args: Mapping[str, str], context: CommandContext, runtime: GpuRuntime | None = None) -> Answer:
    """``[commands] gpu_reset`` (``nvidia-smi -r -i {gpu}``) for one GPU, ``gpu_reset_all`` for ``all``.

    The driver refuses a reset while any process holds NVML, this agent
    included: NVML is released (event set freed, ``nvmlShutdown``) while the
    command runs, and opened again after it.
    """
    from vetd.agent.api import Answer, fill

    gpu = args.get("gpu", "all")
    if gpu == "all":
        argv = list(context.config.gpu_reset_all)
    elif not gpu.isdigit():
        return Answer(False, f"refused: gpu must be an index or 'all', not {gpu!r}", {})
    else:
        argv = fill(context.config.gpu_reset, gpu=gpu)
    if runtime is None:
        return await context.run(argv)
    async with runtime.nvml_released() as released:
        answer = await context.run(argv)
    return Answer(answer.ok, answer.message, {**answer.data, "nvml": released})


@hookimpl
def vetd_command_veto(action: str, args: Mapping[str, str], configs: PluginConfigs) -> str | None:
    """No GPU reset while compute processes are on the GPU (their work would be lost)."""
    from vetd.agent.api import Outcome

    if action != "gpu_reset":
        return None
    snapshot = runtime_for(configs).snapshot()
    if isinstance(snapshot, Outcome):
        return None  # the driver cannot tell; nvidia-smi -r refuses a busy GPU itself
    target = args.get("gpu", "all")
    busy = []
    for gpu in snapshot.gpus:
        compute = [p for p in gpu.processes or [] if "C" in p.type]
        if compute and target in ("all", str(gpu.index)):
            names = ", ".join(f"{p.name or '?'} ({p.pid})" for p in compute)
            busy.append(f"{gpu.entity}: {names}")
    return f"compute processes still running on {'; '.join(busy)}" if busy else None


@hookimpl
def vetd_node_labels(configs: PluginConfigs) -> Mapping[str, str]:
    from vetd.agent.api import Outcome

    runtime = runtime_for(configs)
    snapshot = runtime.snapshot()
    if isinstance(snapshot, Outcome) or not snapshot.gpus:
        return {}
    return {
        "gpu_model": snapshot.gpus[0].name,
        "gpu_count": str(len(snapshot.gpus)),
        "gpu_driver": snapshot.driver_version or "",
    }


@hookimpl
def vetd_cli_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    xid = subparsers.add_parser(
        "xid", help="decode the XIDs, SXids and fallen-off-the-bus lines of a kernel log",
        description="Decode a kernel log offline (dmesg, dmesg -T, journalctl -k, kern.log, /dev/kmsg records): "
        "each XID, NVSwitch SXid and 'fallen off the bus' line with its GPU, NVIDIA's meaning and resolution, "
        "the severity vetd gives it and what the default rules would do (drain, alert, none), grouped in bursts "
        "per GPU and XID. Exit 0: nothing critical; 1: a critical finding; 2: the file cannot be read.")
    xid.add_argument("file", metavar="FILE", help="the log, or - for standard input")
    xid.add_argument("--json", action="store_true", help="one JSON object per burst per line")
    xid.add_argument("--config", metavar="AGENT.toml",
                     help="take the site's [plugins.gpu_health] severities (xid_severity...) from this agent config")
    xid.set_defaults(func=_xid)
    sim = subparsers.add_parser(
        "nvml-sim", help="the simulated GPU node's stand-ins (tests, demos)",
        description="Stand-ins for the tools of a node whose GPUs are a scenario served by the simulated "
        "libnvidia-ml (`vetd check --scenario F --through-nvml`, [plugins.gpu_health] through_nvml = true).")
    actions = sim.add_subparsers(dest="action", required=True)
    reset = actions.add_parser(
        "reset", help="nvidia-smi -r: refused while a process holds NVML on the simulated node",
        description="As `nvidia-smi -r [-i GPU]` on the scenario's node: exits 255 (\"in use by another "
        "process\") while any process has the simulated NVML open, 0 otherwise. Use it as [commands] "
        "gpu_reset = [\"vetd\", \"nvml-sim\", \"reset\", \"SCENARIO\", \"-i\", \"{gpu}\"].")
    reset.add_argument("scenario", metavar="SCENARIO", help="the scenario YAML the agent serves")
    reset.add_argument("-i", "--id", dest="gpu", default="all", help="GPU index (default: every GPU)")
    reset.set_defaults(func=_nvml_sim_reset)
    exporter = actions.add_parser(
        "dcgm-exporter", help="dcgm-exporter's /metrics for the scenario's GPUs",
        description="Serve the scenario's GPUs as NVIDIA's dcgm-exporter does (Prometheus text on "
        "http://HOST:PORT/metrics: DCGM profiling fields 1002-1012 as ratios and bytes/s, labelled by GPU "
        "and UUID), for [plugins.telemetry] profiling = \"dcgm\" or \"auto\" with dcgm_url pointing here. "
        "Runs until SIGTERM or Ctrl-C; prints the URL once listening.")
    exporter.add_argument("scenario", metavar="SCENARIO", help="the scenario YAML (the agent's, for the same GPUs)")
    exporter.add_argument("--listen", metavar="HOST:PORT", type=_listen, default=("127.0.0.1", 9400),
                          help="address to serve on (default 127.0.0.1:9400, dcgm-exporter's port; port 0: any "
                          "free one)")
    exporter.add_argument("--fields", choices=("profiling", "default"), default="profiling",
                          help="profiling: every profiling field (SM activity and occupancy included); default: "
                          "those dcgm-exporter's shipped dcp-metrics-included.csv enables (no SM activity or "
                          "occupancy)")
    exporter.add_argument("--hostname", default="", help="the Hostname label (default: this host's name)")
    exporter.set_defaults(func=_nvml_sim_exporter)


def _listen(value: str) -> tuple[str, int]:
    """An argparse type: ``HOST:PORT`` (or ``:PORT``, ``PORT``), the port 0 to 65535."""
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port from 0 to 65535, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _nvml_sim_exporter(args: argparse.Namespace) -> int:
    from vetd.plugins.gpu_health.dcgmsim import serve

    host, port = args.listen
    return serve(args.scenario, host, port, args.fields, args.hostname)


def _nvml_sim_reset(args: argparse.Namespace) -> int:
    from vetd.plugins.gpu_health.nvmlsim import reset_stand_in

    status, text = reset_stand_in(args.scenario, args.gpu)
    print(text)
    return status


def _xid(args: argparse.Namespace) -> int:
    from vetd.plugins.gpu_health.kernlog import run

    return run(args)
