"""Commands from the controller: what the agent will do, and how.

Only actions in ``[commands] allow`` run; everything else is refused and
logged. The agent itself answers two:

* ``ping``: answers ``pong``.
* ``revet`` (``profile``): runs that profile's checks once, publishes their
  results, and answers ok only if none failed, errored or timed out.
* ``diagnose`` (``profile``, default ``full``): the same, asked by a rule's
  ``diagnose`` action while the node is in service (not drained): its own
  entry in ``[commands] allow``, so a site can allow re-vetting after healing
  and not runs on a node that may hold a job. The results go to the rules.
* ``vet`` (``campaign``, ``step``, a body): a step of a campaign the
  controller runs on idle nodes, bandwidth between them in pairs
  (:mod:`vetd.agent.campaign`); not allowed by default, since it sends
  traffic to the peers the controller names.

Every other action is an :class:`AgentCommand` a plugin registers through
``vetd_register_commands``, built-ins as third parties: ``gpu_reset`` comes
from ``gpu_health``, ``restart_service`` from ``host``. Before a plugin's
command runs, every plugin may veto it (``vetd_command_veto``: no GPU reset
while compute processes hold the GPU). Arguments must be plain words
(letters, digits, ``_.@:-``); commands run as argv lists with a deadline,
never through a shell.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from vetd.agent.checks import PROFILE, Check, CheckRun, CheckRunner, RegistryError, _Registry, clip
from vetd.agent.config import CommandsSection
from vetd.core import proc
from vetd.core.protocol import BAD_STATUSES, Command

if TYPE_CHECKING:
    from vetd.agent.campaign import CampaignMember
    from vetd.agent.pluginhost import PluginHost

log = structlog.get_logger("vetd.commands")

_SAFE_ARG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")


@dataclass
class Answer:
    ok: bool
    message: str
    data: dict[str, str]
    #: A structured answer (a campaign's pair-round message, :mod:`vetd.agent.campaign`).
    body: bytes = b""


def fill(template: Sequence[str], **values: str) -> list[str]:
    return [part.format(**values) for part in template]


async def run_argv(argv: list[str], timeout: float) -> Answer:
    try:
        done = await proc.run(argv, timeout, merge_stderr=True)
    except proc.ProcError as exc:
        return Answer(False, str(exc), {})
    text = clip(done.stdout.strip(), 500)
    data = {"exit": str(done.returncode), "seconds": f"{done.seconds:.2f}"}
    if done.returncode != 0:
        return Answer(False, f"{' '.join(argv)} exited {done.returncode}: {text}", data)
    return Answer(True, text or f"{' '.join(argv)}: done", data)


@dataclass(frozen=True)
class CommandContext:
    """What a plugin's command may use: the ``[commands]`` section and a deadline-bound runner."""

    config: CommandsSection

    async def run(self, argv: Sequence[str]) -> Answer:
        """Run ``argv`` (no shell) within ``[commands] timeout``; its exit status and output are the answer."""
        return await run_argv(list(argv), float(self.config.timeout))


@dataclass(frozen=True)
class AgentCommand:
    """An action the controller may ask of a node, once ``[commands] allow`` lists it.

    ``run(args, context)`` does it and answers; it runs on the agent's event
    loop, so blocking work goes through ``context.run`` or ``asyncio.to_thread``.
    """

    name: str
    run: Callable[[Mapping[str, str], CommandContext], Awaitable[Answer]]
    description: str = ""
    plugin: str = ""


#: Actions the agent answers itself; a plugin cannot register these names.
CORE_ACTIONS = ("ping", "revet", "diagnose", "vet")


class CommandRegistry(_Registry[AgentCommand]):
    """Where plugins add their commands (``registry.add(AgentCommand(...))``)."""

    def add(self, item: AgentCommand) -> None:
        if item.name in CORE_ACTIONS:
            raise RegistryError(f"{item.name!r} is the agent's own command, not {self.plugin!r}'s")
        super().add(item)


class Commands:
    """Carries out allowed commands for the agent."""

    def __init__(
        self,
        config: Callable[[], CommandsSection],
        plugins: Callable[[], PluginHost],
        checks: Callable[[], Sequence[Check]],
        publish: Callable[[CheckRun, str], None],
        campaigns: CampaignMember | None = None,
    ) -> None:
        self.config, self.plugins, self.checks, self.publish = config, plugins, checks, publish
        #: This node's part in the controller's campaigns (``vet``).
        self.campaigns = campaigns
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
        if command.action == "diagnose":
            return await self.revet(command.args.get("profile", "full"))
        if command.action == "vet":
            if self.campaigns is None:
                return Answer(False, "refused: this agent takes part in no campaign", {})
            return await self.campaigns.handle(command)
        plugins = self.plugins()
        handler = plugins.commands().get(command.action)
        if handler is None:
            return Answer(False, f"refused: unknown action {command.action!r} (no loaded plugin provides it)", {})
        vetoes = await asyncio.to_thread(plugins.command_vetoes, command.action, command.args)
        if vetoes:
            return Answer(False, "refused: " + "; ".join(vetoes), {})
        return await handler.run(command.args, CommandContext(config))

    async def revet(self, profile: str) -> Answer:
        checks = [c for c in self.checks() if profile in c.profiles]
        if not checks:
            return Answer(False, f"no checks in profile {profile!r}", {})
        token = PROFILE.set(profile)
        try:
            runs = await asyncio.gather(*(self.runner.run(check) for check in checks))
        finally:
            PROFILE.reset(token)
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
