"""The node's ``vetd`` commands: ``agent``, ``check``, ``vet``, ``plugins``; the agent's config sample.

They need only the agent's light dependencies. Registered on the root command
(:mod:`vetd.core.cli`) through ``vetd_cli_commands``, as a plugin's would be.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vetd.core.cli import EXIT_VETD, duration, port
from vetd.core.hookspecs import hookimpl
from vetd.core.output import table

if TYPE_CHECKING:
    from vetd.agent.config import AgentConfig

DEFAULT_AGENT_CONFIG = "/etc/vetd/agent.toml"


def agent_config_path(value: str | None) -> Path | None:
    """An explicit --config, else $VETD_CONFIG, else /etc/vetd/agent.toml if present."""
    chosen = value or os.environ.get("VETD_CONFIG")
    if chosen:
        return Path(chosen)
    default = Path(DEFAULT_AGENT_CONFIG)
    return default if default.exists() else None


def _agent_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"agent TOML config (default $VETD_CONFIG or {DEFAULT_AGENT_CONFIG})")


@hookimpl
def vetd_cli_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub = subparsers
    agent = sub.add_parser("agent", help="run the node daemon (systemd service)",
                           description="Run the node daemon: scheduled checks and telemetry, "
                           "streamed to the controller over MQTT. Env VETD_BROKER, VETD_CLUSTER "
                           "and VETD_NODE override the config file.")
    _agent_config_arg(agent)
    agent.set_defaults(func=_agent)

    check = sub.add_parser("check", help="run checks once on this node (prolog, preflight)",
                           description="Run checks once on this node and print the results. "
                           "Exit 0: all pass, warn or skip; 1: a check failed (a node fault); "
                           "2: vetd itself could not run, or a check errored or timed out.")
    _agent_config_arg(check)
    check.add_argument("--profile", help="run the checks of this profile (prolog, periodic, full)")
    check.add_argument("--json", action="store_true", help="one JSON object per result per line")
    check.add_argument("--list", action="store_true", help="list the available checks and exit")
    check.add_argument("--capture", metavar="FILE.xml",
                       help="GPU checks read this `nvidia-smi -q -x` capture instead of NVML "
                       "(triage a dump from a node already out of service)")
    check.add_argument("--scenario", metavar="FILE.yaml", help="GPU checks follow this scenario instead of NVML")
    check.add_argument("--at", metavar="DURATION", type=duration,
                       help="with --scenario: evaluate the state this far into it (default: its end)")
    check.add_argument("--through-nvml", action="store_true",
                       help="with --capture or --scenario: serve it through a simulated libnvidia-ml, "
                       "so the live NVML code path reads it")
    check.add_argument("--expect-gpus", type=int, metavar="N",
                       help="GPUs the node should have (default: sysfs, or the capture's attached_gpus)")
    check.add_argument("--array-backend", choices=("cupy", "numpy"),
                       help="GPU compute checks run their numerics on CuPy (the GPUs, default) or NumPy "
                       "(the CPU: a dry run, CI); sets [plugins.gpu_compute] and [plugins.nccl] array_backend")
    check.add_argument("--force", action="store_true",
                       help="run nccl_allreduce with one rank on a one-GPU node instead of skipping it")
    check.add_argument("--protocol", metavar="FILE.yaml",
                       help="run the checks a vetting protocol names, with its parameters (vetd's format "
                       "or vetnode's; see packaging/protocols/)")
    check.add_argument("checks", nargs="*", metavar="CHECK", help="checks to run (default: all)")
    check.set_defaults(func=_check)

    slurm = sub.add_parser("slurm", help="Slurm prolog and epilog (slurm.conf Prolog= / Epilog=)",
                           description="Run as Slurm's Prolog= / Epilog= (packaging/slurm/ has the wrappers): "
                           "ask this node's agent to vet it for the job in SLURM_JOB_ID. Exit 1: a node fault "
                           "(Slurm drains the node; a prolog's job is requeued); 0 otherwise, vetd's own failure "
                           "included (logged to syslog, tag vetd-slurm).")
    stages = slurm.add_subparsers(dest="stage", required=True, metavar="STAGE", parser_class=type(slurm))
    for stage, text in (("prolog", "before the job: job start, the [slurm] prolog_profile checks"),
                        ("epilog", "after the job: the epilog_profile checks, job end with its exit state")):
        parser = stages.add_parser(stage, help=text, description=f"{text}. Reads SLURM_JOB_ID, SLURMD_NODENAME, "
                                   "SLURM_JOB_USER, SLURM_JOB_GPUS (else CUDA_VISIBLE_DEVICES)"
                                   + (", SLURM_JOB_EXIT_CODE2 / SLURM_JOB_EXIT_CODE, SLURM_JOB_DERIVED_EC"
                                      if stage == "epilog" else "") + ".")
        _agent_config_arg(parser)
        parser.set_defaults(func=_slurm, setup_logs=False)  # it logs to syslog (log_local), not structlog

    vet = sub.add_parser("vet", help="vet nodes across the network: in a job step, or NODES from the controller host",
                         description="Inside a job step, one task per node (srun --ntasks-per-node=1 vetd vet): "
                         "every task runs the node-local checks (--protocol, else the prolog profile), then the "
                         "tasks meet (rank 0 serves the rendezvous; the Slurm environment says who is where) and "
                         "measure bandwidth between nodes in rounds of pairs. A node slow with every partner is "
                         "bad; a slow pair of good nodes is a bad link, named as such; a task that never arrives "
                         "is absent. Rank 0 prints the verdicts. Exit 0: at least --need nodes are good; 1: fewer; "
                         "2: vetd could not run. With NODES, on the controller host: a campaign, the running "
                         "controller measures the idle ones among NODES through their agents (signed `vet` "
                         "commands; [campaigns] in its config) and stores one fabric_pairs result per node for "
                         "the rules; nodes with a job or out of service are skipped. Exit 0: no node bad (and at "
                         "least --need good); 1: a node bad; 2: nothing could be measured.")
    vet.add_argument("nodes", nargs="?", metavar="NODES",
                     help="a campaign from the controller host on these nodes (a hostlist, nid[001-016]); "
                     "--config is then the controller's")
    vet.add_argument("--config", help=f"agent TOML config (default $VETD_CONFIG or {DEFAULT_AGENT_CONFIG}); with "
                     "NODES the controller's (default $VETD_CONTROLLER_CONFIG or /etc/vetd/controller.toml)")
    vet.add_argument("--protocol", metavar="FILE.yaml",
                     help="node-local checks of a vetting protocol (as vetd check --protocol); default: the "
                     "prolog profile")
    vet.add_argument("--need", type=int, metavar="N", help="exit 0 when at least N nodes are good (default: all)")
    vet.add_argument("--good-file", metavar="FILE", help="rank 0 writes the good nodes here, as a folded hostlist "
                     "for srun --nodelist")
    vet.add_argument("--bad-file", metavar="FILE", help="rank 0 writes the bad nodes here (srun --exclude); absent "
                     "nodes are in neither file")
    vet.add_argument("--json", action="store_true",
                     help="one JSON object per node per line: node, verdict (good, bad, absent), reason, metrics")
    # Not given: a job takes the defaults below, a campaign its controller's [campaigns] values.
    vet.add_argument("--test", default=argparse.SUPPRESS, metavar="NAME",
                     help="pair test: auto (NCCL where every node has GPUs and NCCL, else TCP), tcp_pairs, "
                     "nccl_pairs (default auto)")
    vet.add_argument("--deadline", type=duration, default=argparse.SUPPRESS, metavar="DURATION",
                     help="a task that has not reached rank 0 this long after rank 0 started is absent (default "
                     "60s); in a campaign, an agent that has not joined")
    vet.add_argument("--rounds", type=_rounds, default=argparse.SUPPRESS, metavar="N|all",
                     help="rounds of pairs (default 3: two partners on the ring, one across it); all: every pair")
    vet.add_argument("--slow-fraction", type=_fraction, default=argparse.SUPPRESS, metavar="F",
                     help="a pair below F times the median of all pairs is slow (default 0.5)")
    vet.add_argument("--min-gbps", type=float, default=argparse.SUPPRESS, metavar="GB/S",
                     help="a pair below this (decimal GB/s) is slow too (default: none)")
    vet.add_argument("--port", type=port, metavar="PORT",
                     help="TCP port of rank 0's rendezvous (default: 18000 + a number from the job and step ids)")
    vet.set_defaults(func=_vet)

    plugins = sub.add_parser("plugins", help="list the plugins this node loads and what they provide",
                             description="Every plugin the agent would load with this config: its name, where "
                             "it comes from (built-in, an installed package and its version, load_plugins), "
                             "its checks and config tables; and the plugins that failed to load, with why.")
    _agent_config_arg(plugins)
    plugins.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    plugins.set_defaults(func=_plugins)




@hookimpl
def vetd_config_samples() -> Mapping[str, Callable[[], str]]:
    def agent_sample() -> str:  # the plugins' config structs are imported when the sample is asked for
        from vetd.agent.configsample import agent_sample

        return agent_sample()

    return {"agent": agent_sample}


def _agent(args: argparse.Namespace) -> int:
    from vetd.agent.daemon import run_agent

    return run_agent(agent_config_path(args.config))


def _check(args: argparse.Namespace) -> int:
    from vetd.agent import oneshot
    from vetd.agent.config import load_agent_config
    from vetd.agent.pluginhost import PluginError, PluginHost
    from vetd.core.configfile import ConfigError

    try:
        config = load_agent_config(agent_config_path(args.config))
        gpu = _gpu_overrides(args)
        if gpu:
            config.plugins.setdefault("gpu_health", {}).update(gpu)
        _compute_overrides(args, config.plugins)
        if args.protocol:
            if args.checks or args.profile or args.list:
                raise ConfigError("--protocol names the checks and the profile: no CHECK, --profile or --list with it")
            return _protocol(config, Path(args.protocol), args.json)
        if args.list:
            registered = list(PluginHost(config).register_checks())
            if args.json:
                print(json.dumps([{"check": c.name, "plugin": c.plugin, "profiles": sorted(c.profiles),
                                   "description": c.description} for c in registered], indent=1))
            else:
                sys.stdout.write(table(("CHECK", "PLUGIN", "PROFILES", "DESCRIPTION"), [
                    (c.name, c.plugin, ",".join(sorted(c.profiles)), c.description) for c in registered]))
            return 0
        return oneshot.main(config, args.checks, args.profile, args.json)
    except ConfigError as exc:
        print(f"vetd: config error: {exc}", file=sys.stderr)
        return EXIT_VETD
    except (oneshot.SelectionError, PluginError) as exc:
        print(f"vetd: {exc}", file=sys.stderr)
        return EXIT_VETD
    except Exception as exc:  # noqa: BLE001 - exit 2 means "vetd itself failed", never 1
        print(f"vetd: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_VETD


def _slurm(args: argparse.Namespace) -> int:
    from vetd.agent.slurm import main, process_started

    started = process_started()
    return main(args.stage, agent_config_path(args.config), started=started)


def _rounds(value: str) -> int | None:
    from vetd.agent.vet import rounds_arg

    return rounds_arg(value)


def _fraction(value: str) -> float:
    from vetd.agent.vet import fraction_arg

    return fraction_arg(value)


def _vet(args: argparse.Namespace) -> int:
    from vetd.agent import vet
    from vetd.agent.pluginhost import PluginError
    from vetd.core.configfile import ConfigError

    if args.nodes is not None:
        from vetd.controller.cli import run_campaign

        return run_campaign(args)
    try:
        return vet.main(args)
    except vet.VetError as exc:
        print(f"vetd: vet: {exc}", file=sys.stderr)
    except ConfigError as exc:
        print(f"vetd: config error: {exc}", file=sys.stderr)
    except PluginError as exc:
        print(f"vetd: {exc}", file=sys.stderr)
    return EXIT_VETD


def _compute_overrides(args: argparse.Namespace, tables: dict[str, dict[str, object]]) -> None:
    """``--array-backend`` and ``--force`` are shortcuts for [plugins.gpu_compute] / [plugins.nccl] keys."""
    if args.array_backend:
        for table in ("gpu_compute", "nccl"):
            tables.setdefault(table, {})["array_backend"] = args.array_backend
    if args.force:
        tables.setdefault("nccl", {})["single_rank"] = True


def _protocol(config: AgentConfig, path: Path, as_json: bool) -> int:
    from vetd.agent import oneshot
    from vetd.agent.pluginhost import PluginHost
    from vetd.agent.vetting import load_protocol

    host = PluginHost(config)
    check_plugins = {check.name: check.plugin for check in host.register_checks()}
    protocol = load_protocol(path, check_plugins, host.config_tables(), config.plugins)
    for name, keys in protocol.overrides.items():
        config.plugins.setdefault(name, {}).update(keys)
    return oneshot.main(config, protocol.checks, protocol.profile, as_json)


def _plugins(args: argparse.Namespace) -> int:
    from vetd.agent.config import load_agent_config
    from vetd.agent.pluginhost import PluginHost

    host = PluginHost(load_agent_config(agent_config_path(args.config)))
    checks = host.register_checks()
    tables = host.table_plugins()
    rows = [{"name": name, "origin": host.origins.get(name, "?"), "status": "broken" if name in host.broken else "ok",
             "checks": sorted(c.name for c in checks if c.plugin == name),
             "tables": sorted(f"plugins.{t}" for t, owner in tables.items() if owner == name),
             "error": host.broken.get(name, "")}
            for name in sorted({*host.names(), *host.broken})]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from vetd.core.output import table

    sys.stdout.write(table(("PLUGIN", "ORIGIN", "STATUS", "CHECKS / ERROR"),
                           [(str(r["name"]), str(r["origin"]), str(r["status"]),
                             str(r["error"]) or ", ".join(r["checks"]) or "-") for r in rows]))
    return 0


def _gpu_overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--capture`` and friends are shortcuts for ``[plugins.gpu_health]`` keys."""
    from vetd.core.configfile import ConfigError

    if args.capture and args.scenario:
        raise ConfigError("--capture and --scenario: choose one")
    overrides: dict[str, object] = {}
    if args.capture:
        overrides.update(source="capture", capture=str(Path(args.capture).resolve()))
    if args.scenario:
        overrides.update(source="scenario", scenario=str(Path(args.scenario).resolve()))
        overrides["scenario_at"] = args.at if args.at is not None else 1e9
    elif args.at is not None:
        raise ConfigError("--at needs --scenario")
    if args.through_nvml:
        if not (args.capture or args.scenario):
            raise ConfigError("--through-nvml needs --capture or --scenario")
        overrides["through_nvml"] = True
    if args.expect_gpus is not None:
        overrides["expected_gpus"] = args.expect_gpus
    return overrides


