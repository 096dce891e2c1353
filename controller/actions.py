"""What the controller does to the world: scheduler backends and alert delivery.

Scheduler backends exclude a node from new jobs:

* ``none`` (default): vetd only records the exclusion; ``vetd excluded`` prints
  the hostlist for ``srun --exclude``.
* ``slurm``: ``scontrol update NodeName=<n> State=DRAIN Reason="vetd: …"``, as an
  argv list (never a shell), honouring ``SLURM_CONF``, then ``scontrol show
  node`` to confirm Slurm has it (the executor retries until it does). A node
  already drained by someone else (reason not starting with ``vetd:``) is left
  alone, so an operator's reason is never overwritten. Node names are checked
  (:func:`~vetd.core.protocol.valid_name`) and every argument comes after
  ``--``, so no name can be read as an option.

Alerts are Alertmanager API v2 shaped (``POST /api/v2/alerts`` body: a JSON list
of ``{labels, annotations, startsAt, endsAt, generatorURL}``) and sent to every
configured URL, with retries, off the ingest path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from vetd.controller.decisions import Alert
from vetd.core import proc
from vetd.core.protocol import Command, valid_name
from vetd.core.slurm import REASON_PREFIX as REASON_PREFIX  # the controller imports them from here
from vetd.core.slurm import clean_reason as clean_reason
from vetd.core.slurm import find_program

log = structlog.get_logger("vetd.actions")



@dataclass(frozen=True)
class ActionOutcome:
    ok: bool
    #: ``done``, ``skipped`` or ``failed``.
    outcome: str
    detail: str


#: The controller's own healing steps (phases of the ladder, not agent commands).
OWN_STEPS = ("revet", "reboot")


@dataclass(frozen=True)
class HealingStep:
    """A step of a ``heal:`` ladder that sends the node one agent command.

    ``args(arg, gpu)`` builds the command's arguments from the step's argument
    (``restart_service nvidia-fabricmanager`` → ``nvidia-fabricmanager``) and
    the GPU the rule matched (``gpu3`` → ``3``, else ``all``).
    """

    action: str
    args: Callable[[str, str], dict[str, str]]
    needs_arg: bool = False
    example: str = ""
    description: str = ""


class SchedulerBackend(Protocol):
    name: str

    async def drain(self, node: str, reason: str) -> ActionOutcome: ...

    async def resume(self, node: str) -> ActionOutcome: ...

    async def reboot(self, node: str, reason: str) -> ActionOutcome: ...


#: The Slurm states (``scontrol show node``'s ``State``: the base state and its flags joined with
#: ``+``) in which a campaign may measure a node: nothing allocated, nothing completing, not
#: draining, down, reserved, powered down or failing to answer (``*``).
IDLE_STATES = frozenset({"IDLE", "IDLE+CLOUD"})


async def idle_states(backend: SchedulerBackend, nodes: Sequence[str]) -> dict[str, str] | None:
    """Node → ``""`` when the scheduler has it idle, else what it has it as (``ALLOCATED``, ``IDLE+DRAIN``,
    ``unknown to Slurm``); None when the backend cannot tell (``none``: no scheduler; a plugin's backend
    without an ``idle`` method). Raises :class:`SlurmError` when the scheduler cannot be asked."""
    idle = getattr(backend, "idle", None)
    if idle is None:
        return None
    states: dict[str, str] = await idle(nodes)
    return states


class AlertBackend(Protocol):
    """Where alerts go (Alertmanager, any webhook receiver)."""

    @property
    def enabled(self) -> bool:
        """False: no receiver configured, so the engine decides no alerts at all."""

    async def send(self, alerts: list[dict[str, Any]]) -> list[ActionOutcome]: ...


class CommandBackend(Protocol):
    """How a command reaches an agent (the controller's MQTT link)."""

    async def publish(self, command: Command) -> None: ...


class NoScheduler:
    """Exclusions live only in vetd (``vetd excluded`` exports them)."""

    name = "none"

    async def drain(self, node: str, reason: str) -> ActionOutcome:
        return ActionOutcome(True, "done", "recorded in vetd only (scheduler backend none)")

    async def resume(self, node: str) -> ActionOutcome:
        return ActionOutcome(True, "done", "recorded in vetd only (scheduler backend none)")

    async def reboot(self, node: str, reason: str) -> ActionOutcome:
        return ActionOutcome(False, "skipped", "scheduler backend none cannot reboot nodes")


class SlurmError(Exception):
    pass


class Slurm:
    """Drains through ``scontrol``."""

    name = "slurm"

    def __init__(self, scontrol: str = "scontrol", timeout: float = 30.0) -> None:
        self.scontrol = scontrol
        self.timeout = timeout

    async def _run(self, *args: str, options: tuple[str, ...] = ()) -> str:
        """``scontrol [options] -- args``: nothing in ``args`` is ever taken for an option."""
        executable = find_program(self.scontrol)
        try:
            done = await proc.run([executable, *options, "--", *args], self.timeout, env=os.environ)
        except proc.ProcError as exc:
            raise SlurmError(f"scontrol {' '.join(args[:2])}: {exc}") from None
        if done.returncode != 0:
            raise SlurmError((done.stderr or done.stdout).strip() or f"exit {done.returncode}")
        return done.stdout

    async def show(self, node: str) -> dict[str, str]:
        """``scontrol show node -o`` parsed into fields (State, Reason…)."""
        return _node_fields((await self._run("show", "node", node, options=("-o",))).strip())

    async def idle(self, nodes: Sequence[str]) -> dict[str, str]:
        """Node → ``""`` when Slurm has it idle (:data:`IDLE_STATES`), else its state (a campaign
        measures only idle nodes). One ``scontrol -o show node`` for every node Slurm has."""
        text = await self._run("show", "node", options=("-o",))
        states = {fields.get("NodeName", ""): fields.get("State", "")
                  for fields in map(_node_fields, text.splitlines()) if fields}
        return {node: ("" if states.get(node) in IDLE_STATES else states.get(node) or "unknown to Slurm")
                for node in nodes}

    async def drain(self, node: str, reason: str) -> ActionOutcome:
        """Drain ``node`` and read it back: ``done`` only once Slurm shows it DRAIN (or DRAINING, DRAINED)."""
        if not valid_name(node):
            return _not_a_node(node)
        try:
            current = await self.show(node)
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol show node: {exc}")
        state = current.get("State", "")
        existing = current.get("Reason", "")
        if ("DRAIN" in state or "DOWN" in state) and existing and not existing.startswith(REASON_PREFIX):
            return ActionOutcome(
                True, "skipped", f"already {state} by someone else (reason {existing!r}); left as is"
            )
        try:
            await self._run("update", f"NodeName={node}", "State=DRAIN", f"Reason={clean_reason(reason)}")
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol update: {exc}")
        try:
            after = (await self.show(node)).get("State", "")
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol show node (confirming): {exc}")
        if "DRAIN" not in after:
            return ActionOutcome(False, "failed", f"not confirmed: Slurm shows {after or 'no state'} after the drain")
        return ActionOutcome(True, "done", f"drained in Slurm (was {state or 'unknown'}, now {after})")

    async def resume(self, node: str) -> ActionOutcome:
        """Return a node to service, but only one vetd drained (reason ``vetd:``); ``done`` once Slurm
        no longer shows it drained."""
        if not valid_name(node):
            return _not_a_node(node)
        try:
            current = await self.show(node)
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol show node: {exc}")
        state, reason = current.get("State", ""), current.get("Reason", "")
        if "DRAIN" not in state and "DOWN" not in state and "FAIL" not in state:
            return ActionOutcome(True, "skipped", f"not drained in Slurm ({state or 'unknown'})")
        if not reason.startswith(REASON_PREFIX):
            return ActionOutcome(False, "refused",
                                 f"{state} with reason {reason!r}: not vetd's drain, left to its owner")
        try:
            await self._run("update", f"NodeName={node}", "State=RESUME")
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol update: {exc}")
        try:
            after = (await self.show(node)).get("State", "")
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol show node (confirming): {exc}")
        if "DRAIN" in after:
            return ActionOutcome(False, "failed", f"not confirmed: Slurm still shows {after} after the resume")
        return ActionOutcome(True, "done", f"resumed in Slurm (was {state}, now {after or 'unknown'})")

    async def reboot(self, node: str, reason: str) -> ActionOutcome:
        """``scontrol reboot ASAP nextstate=DOWN``: the node comes back drained and vetd decides."""
        if not valid_name(node):
            return _not_a_node(node)
        try:
            await self._run("reboot", "ASAP", "nextstate=DOWN", f"reason={clean_reason(reason)}", node)
        except SlurmError as exc:
            return ActionOutcome(False, "failed", f"scontrol reboot: {exc}")
        return ActionOutcome(True, "done", "reboot requested (ASAP, next state DOWN)")


def _node_fields(line: str) -> dict[str, str]:
    """One node's line of ``scontrol -o show node`` as fields. Reason comes last and may hold spaces
    and '=': taken whole, minus the " [user@time]" Slurm appends."""
    head, _, reason = line.strip().partition(" Reason=")
    fields = dict(part.split("=", 1) for part in head.split() if "=" in part)
    if reason:
        fields["Reason"] = re.sub(r"\s*\[[^\]]*@[^\]]*\]$", "", reason)
    return fields


def _not_a_node(node: str) -> ActionOutcome:
    """Final, never retried: such a name could reach scontrol as an option or a second argument."""
    return ActionOutcome(False, "refused", f"{node!r} is not a valid node name; scontrol not run")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def alert_payload(
    *,
    rule: str,
    cluster: str,
    node: str,
    severity: str,
    summary: str,
    description: str,
    starts_at: float,
    ends_at: float | None = None,
    labels: dict[str, str] | None = None,
    entity: str = "",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One alert in Alertmanager API v2 form."""
    alert_labels = {
        "alertname": rule,
        "cluster": cluster,
        "node": node,
        "severity": severity,
        **({"entity": entity} if entity and entity != "node" else {}),
        **(labels or {}),
    }
    alert: dict[str, Any] = {
        "labels": alert_labels,
        "annotations": {"summary": summary, "description": description, **(annotations or {})},
        "startsAt": iso(starts_at),
        "generatorURL": f"vetd://{cluster}/node/{node}",
    }
    if ends_at is not None:
        alert["endsAt"] = iso(ends_at)
    return alert


def resolved(alert: dict[str, Any], now: float) -> Alert:
    """A firing alert, sent once more as ended at ``now``."""
    labels = alert.get("labels", {})
    return Alert(labels.get("cluster", ""), labels.get("node", ""), labels.get("alertname", ""),
                 [{**alert, "endsAt": iso(now)}])


class AlertSender:
    """Posts alerts to every URL, retrying with backoff; never blocks the caller."""

    def __init__(self, urls: list[str], timeout: float = 10.0, attempts: int = 4) -> None:
        self.urls = urls
        self.timeout = timeout
        self.attempts = attempts

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    def _post(self, url: str, body: bytes) -> int:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return int(response.status)

    async def send(self, alerts: list[dict[str, Any]]) -> list[ActionOutcome]:
        body = json.dumps(alerts).encode()
        outcomes = []
        for url in self.urls:
            outcomes.append(await self._send_one(url, body))
        return outcomes

    async def _send_one(self, url: str, body: bytes) -> ActionOutcome:
        error = ""
        for attempt in range(self.attempts):
            try:
                status = await asyncio.to_thread(self._post, url, body)
                return ActionOutcome(True, "done", f"{url}: HTTP {status}")
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                error = str(getattr(exc, "reason", exc))
                log.warning("alert_delivery_failed", url=url, attempt=attempt + 1, error=error)
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
        return ActionOutcome(False, "failed", f"{url}: {error}")
