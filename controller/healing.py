"""The healing ladder: step → probation → resume, or the next step → failed (no I/O).

A ladder (``heal: [gpu_reset, reboot, …]``) is kept in the engine's model and
persisted with it, so a restarted controller carries on where it was. Its phases: ``next`` (start
step ``step``), ``step`` (the step's command is out), ``rebooting`` (waiting
for the agent to come back with a new session) and ``probation`` (re-vetting).
Commands to agents and reboots are decisions; the executor carries them out.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from vetd.controller.actions import REASON_PREFIX, HealingStep, clean_reason
from vetd.controller.config import HealingSection
from vetd.controller.decisions import Decisions, Reboot, Send
from vetd.controller.lifecycle import Lifecycle
from vetd.controller.model import FleetState, Healing, HistoryRecord, NodeRow
from vetd.core.protocol import Command, Event, Reply, Result, node_key, sign_command


def signed_command(node: NodeRow, action: str, args: dict[str, str], now: float, *, session: str,
                   master_key: bytes, expires_in: float, command_id: str = "", body: bytes = b"") -> Command:
    """A command to ``node`` from this controller run (``session``), signed with the node's key
    derived from ``master_key`` (unsigned without one), refused by the agent after ``expires_in``;
    ``command_id`` (default: a new one) and ``body`` for a campaign's steps."""
    command = Command(cluster=node.cluster, node=node.name, session=session, seq=0, ts=now,
                      id=command_id or uuid.uuid4().hex, action=action, args=args, expires=now + expires_in,
                      body=body)
    key = node_key(master_key, node.cluster, node.name) if master_key else b""
    return sign_command(command, key) if key else command


def gpu_of(message: Result | Event) -> str:
    """The GPU index a ``gpu_reset`` step resets: ``gpu3`` → ``3``, anything else → ``all``."""
    return message.entity[3:] if message.entity.startswith("gpu") and message.entity[3:].isdigit() else "all"


class Ladders:
    """Every node's healing ladder, advanced by replies and by time."""

    def __init__(self, state: FleetState, config: HealingSection, lifecycle: Lifecycle, *,
                 session: str, command_key: bytes, steps: Mapping[str, HealingStep]) -> None:
        self.state, self.config, self.lifecycle = state, config, lifecycle
        #: Steps that send an agent command, by name (plugins add more); revet and reboot are the ladder's own.
        self.steps = steps
        #: This controller run, as the session of the commands it sends.
        self.session, self.command_key = session, command_key

    def start(self, rule: str, ladder: list[str], node: NodeRow, message: Result | Event, now: float) -> None:
        gpu = gpu_of(message)
        self.state.save_healing(Healing(node.cluster, node.name, rule, list(ladder), 0, "next", now, gpu=gpu))
        self.state.audit(node.cluster, node.name, "heal_start", rule=rule,
                         detail=f"ladder: {', '.join(ladder)}; gpu {gpu}", now=now)
        self.lifecycle.set_state(node, "healing", now)

    def on_reply(self, reply: Reply, now: float, decisions: Decisions) -> bool:
        """Advance the ladder of the node that answered; False for a reply that answers nothing
        of its own: a command id of another node's (a node may answer only what it was sent), an
        old or unknown one."""
        healing = self.state.healings.get((reply.cluster, reply.node))
        if healing is None or not healing.command_id or healing.command_id != reply.id:
            return False
        node = self.state.node(healing.cluster, healing.node, now)
        step = healing.ladder[healing.step]
        if healing.phase == "step":
            if not reply.ok:
                self._step_failed(healing, reply.message, now)
                return True
            self.state.audit(node.cluster, node.name, "heal_step", rule=healing.rule, outcome="done",
                             detail=f"{step}: {reply.message}", now=now)
            self._probation(healing, node, self.config.probation_profile, now, decisions)
        elif healing.phase == "probation":
            if not reply.ok:
                self._step_failed(healing, f"re-vetting failed: {reply.message}", now)
                self.lifecycle.set_state(node, "healing", now)
                return True
            self.state.end_healing(node.cluster, node.name)
            self.state.audit(node.cluster, node.name, "healed", rule=healing.rule, outcome="done",
                             detail=f"after {step}: {reply.message}", now=now)
            self._remember(healing, "healed", now)
            self.lifecycle.return_to_service(node, f"healed by {step}", now, decisions)
        return True

    def tick(self, now: float, decisions: Decisions) -> None:
        """Advance every ladder that waits on time (start, deadline, reboot)."""
        for healing in self.state.ladders():
            node = self.state.node(healing.cluster, healing.node, now)
            if healing.phase in ("step", "probation") and now > healing.deadline:
                self._step_failed(healing, "no answer from the node in time", now)
                self.lifecycle.set_state(node, "healing", now)
            elif healing.phase == "rebooting":
                if node.online and node.session != healing.session:
                    self.state.audit(node.cluster, node.name, "heal_step", rule=healing.rule, outcome="done",
                                     detail=f"reboot: back with a new session {node.session}", now=now)
                    self._probation(healing, node, self.config.probation_profile, now, decisions)
                elif now > healing.deadline:
                    self._step_failed(healing, "the node did not come back in time", now)
            if healing.phase == "next":
                self._start_step(healing, node, now, decisions)

    def reboot_failed(self, cluster: str, node: str, why: str, now: float) -> None:
        """The scheduler could not reboot the node: on to the next step."""
        for healing in self.state.ladders():
            if (healing.cluster, healing.node) == (cluster, node) and healing.phase == "rebooting":
                self._step_failed(healing, why, now)

    def _start_step(self, healing: Healing, node: NodeRow, now: float, decisions: Decisions) -> None:
        if healing.step >= len(healing.ladder):
            self.state.end_healing(node.cluster, node.name)
            reason = clean_reason(f"{REASON_PREFIX} healing exhausted ({', '.join(healing.ladder)}): {node.reason}")
            self.lifecycle.mark_failed(node, reason, healing.rule, 0, now, decisions)
            return
        verb, _, arg = healing.ladder[healing.step].partition(" ")
        self.lifecycle.set_state(node, "healing", now)
        if (step := self.steps.get(verb)) is not None:
            self._send(healing, node, step.action, step.args(arg.strip(), healing.gpu), "step", now, decisions)
        elif verb == "revet":
            self._probation(healing, node, arg.strip(), now, decisions)
        elif verb == "reboot":
            healing.phase, healing.session = "rebooting", node.session
            healing.deadline = now + float(self.config.reboot_timeout)
            self.state.save_healing(healing)
            audit = self.state.audit(node.cluster, node.name, "heal_command", rule=healing.rule,
                                     outcome="pending", detail="reboot", now=now)
            decisions.other.append(Reboot(node.cluster, node.name,
                                          f"{REASON_PREFIX} healing {healing.rule}: reboot", audit))
        else:  # a step whose plugin is gone since the rules loaded
            self._step_failed(healing, f"no healing step {verb!r} (its plugin is not loaded)", now)
            self._start_step(healing, node, now, decisions)

    def _command(self, node: NodeRow, action: str, args: dict[str, str], now: float) -> Command:
        return signed_command(node, action, args, now, session=self.session, master_key=self.command_key,
                              expires_in=float(self.config.reply_timeout))

    def _send(self, healing: Healing, node: NodeRow, action: str, args: dict[str, str], phase: str,
              now: float, decisions: Decisions) -> None:
        command = self._command(node, action, args, now)
        healing.command_id, healing.phase = command.id, phase
        healing.deadline = now + float(self.config.reply_timeout)
        self.state.save_healing(healing)
        self.state.audit(node.cluster, node.name, "heal_command", rule=healing.rule, outcome="sent",
                         detail=f"{action} {', '.join(f'{k}={v}' for k, v in args.items())} (id {command.id})",
                         now=now)
        decisions.other.append(Send(command))

    def _step_failed(self, healing: Healing, why: str, now: float) -> None:
        step = healing.ladder[healing.step] if healing.step < len(healing.ladder) else "?"
        self.state.audit(healing.cluster, healing.node, "heal_step", rule=healing.rule, outcome="failed",
                         detail=f"{step} (step {healing.step + 1}/{len(healing.ladder)}): {why}", now=now)
        carried_out = healing.phase == "probation" and not step.startswith("revet")
        self._remember(healing, "revet_failed" if carried_out else "failed", now)
        healing.step += 1
        healing.phase, healing.command_id = "next", ""
        self.state.save_healing(healing)

    def _remember(self, healing: Healing, outcome: str, now: float) -> None:
        """The step's outcome in the node's history (``history.node.remediations`` in rules)."""
        if healing.step >= len(healing.ladder):
            return
        verb = healing.ladder[healing.step].partition(" ")[0]
        # A reset of one GPU is that GPU's; any other step (a reboot, a service) acts on the whole node.
        entity = f"gpu{healing.gpu}" if verb == "gpu_reset" and healing.gpu != "all" else ""
        self.state.remember(HistoryRecord(healing.cluster, healing.node, now, "remediation", entity,
                                          (verb, outcome, healing.rule)))

    def _probation(self, healing: Healing, node: NodeRow, profile: str, now: float, decisions: Decisions) -> None:
        self.lifecycle.set_state(node, "probation", now)
        self._send(healing, node, "revet", {"profile": profile}, "probation", now, decisions)
