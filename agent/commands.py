"""Commands from the controller: what the agent will do, and how.

Only actions in ``[commands] allow`` run; everything else is refused and
logged. Actions:

* ``ping``: answers ``pong``.
* ``revet`` (``profile``): runs that profile's checks once, publishes their
  results, and answers ok only if none failed, errored or timed out.
* ``gpu_reset`` (``gpu``: an index, or ``all``): runs ``[commands] gpu_reset``
  (``nvidia-smi -r -i {gpu}``) unless a plugin vetoes it, e.g. while compute
  processes are on that GPU.
* ``restart_service`` (``service``): runs ``[commands] restart_service`` for a
  service listed in ``[commands] services``.

Commands run as argv lists with a deadline, never through a shell.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from vetd.agent.checks import Check, CheckRun, CheckRunner, clip
from vetd.agent.config import CommandsSection
from vetd.agent.pluginhost import PluginHost
from vetd.agent.protocol import BAD_STATUSES, Command

log = structlog.get_logger("vetd.commands")

_SAFE_ARG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")


@dataclass
class Answer:
    ok: bool
    message: str
    data: dict[str, str]


def fill(template: Sequence[str], **values: str) -> list[str]:
    return [part.format(**values) for part in template]


async def run_argv(argv: list[str], timeout: float) -> Answer:
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return Answer(False, f"cannot run {argv[0]}: {exc.strerror or exc}", {})
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return Answer(False, f"{argv[0]} did not finish within {timeout:g}s", {})
    text = clip(output.decode(errors="replace").strip(), 500)
    data = {"exit": str(process.returncode), "seconds": f"{time.monotonic() - started:.2f}"}
    if process.returncode != 0:
        return Answer(False, f"{' '.join(argv)} exited {process.returncode}: {text}", data)
    return Answer(True, text or f"{' '.join(argv)}: done", data)


class Commands:
    """Carries out allowed commands for the agent."""

    def __init__(
        self,
        config: Callable[[], CommandsSection],
        plugins: Callable[[], PluginHost],
        checks: Callable[[], Sequence[Check]],
        publish: Callable[[CheckRun, str], None],
    ) -> None:
        self.config, self.plugins, self.checks, self.publish = config, plugins, checks, publish
        self.runner = CheckRunner()

    async def handle(self, command: Command) -> Answer:
        config = self.config()
        if command.expires and command.expires < time.time():
            return Answer(False, "refused: expired", {})
        if command.action not in config.allow:
            return Answer(False, f"refused: {command.action!r} is not allowed on this node "
                                 f"([commands] allow = {config.allow})", {})
        bad = [f"{k}={v!r}" for k, v in command.args.items() if not _SAFE_ARG.match(v)]
        if bad:
            return Answer(False, f"refused: unsafe argument {', '.join(bad)}", {})
        if command.action == "ping":
            return Answer(True, "pong", {})
        if command.action == "revet":
            return await self.revet(command.args.get("profile", "prolog"))
        vetoes = await asyncio.to_thread(self.plugins().command_vetoes, command.action, command.args)
        if vetoes:
            return Answer(False, "refused: " + "; ".join(vetoes), {})
        if command.action == "gpu_reset":
            gpu = command.args.get("gpu", "all")
            if gpu == "all":
                return await run_argv(list(config.gpu_reset_all), float(config.timeout))
            if not gpu.isdigit():
                return Answer(False, f"refused: gpu must be an index or 'all', not {gpu!r}", {})
            return await run_argv(fill(config.gpu_reset, gpu=gpu), float(config.timeout))
        if command.action == "restart_service":
            service = command.args.get("service", "")
            if service not in config.services:
                return Answer(False, f"refused: service {service!r} is not in [commands] services", {})
            return await run_argv(fill(config.restart_service, service=service), float(config.timeout))
        return Answer(False, f"refused: unknown action {command.action!r}", {})

    async def revet(self, profile: str) -> Answer:
        checks = [c for c in self.checks() if profile in c.profiles]
        if not checks:
            return Answer(False, f"no checks in profile {profile!r}", {})
        runs = await asyncio.gather(*(self.runner.run(check) for check in checks))
        failed = []
        for run in runs:
            self.publish(run, profile)
            failed += [f"{run.check.name}[{o.entity}]" for o in run.outcomes if o.status in BAD_STATUSES]
        data = {"profile": profile, "checks": str(len(checks)), "failed": ",".join(failed)}
        if failed:
            return Answer(False, clip(f"{len(failed)} failed: {', '.join(failed)}", 500), data)
        return Answer(True, f"all {len(checks)} checks of {profile!r} passed", data)


def describe(args: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(args.items()))
