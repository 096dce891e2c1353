"""A rule's ``diagnose`` action: the node runs a profile now, in service (no I/O).

Where a fault is not yet worth a drain (XID 31 twice on a GPU in a day: often the job's
own doing, sometimes the GPU's), a rule may ask for a closer look instead::

    actions: [diagnose]

The controller sends the node a signed ``diagnose`` command (``[healing]
diagnose_profile``, default ``full``); the agent runs that profile's checks once and
publishes their results like any others, so the rules decide on them: a memory test
that fails drains the node through ``check-failed``, a pass changes nothing. The
node is not drained first (its checks leave GPUs with compute processes alone). The
agent must allow it (``[commands] allow`` has ``diagnose`` by default).

Sent at most once at a time per node; not sent to a node offline or out of service
(excluded, healing, probation, failed: its ladder or a person re-vets it). Every
request, skip and answer is in the node's audit trail (action ``diagnose``) and the
request in its history (``history.gpu.diagnoses("24h")``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vetd.controller.actions import iso
from vetd.controller.breaker import OUT_OF_SERVICE
from vetd.controller.config import HealingSection
from vetd.controller.decisions import Decisions, Send
from vetd.controller.healing import signed_command
from vetd.controller.model import FleetState, HistoryRecord, NodeKey, NodeRow
from vetd.core.protocol import Event, Reply, Result


@dataclass(frozen=True, slots=True)
class Asked:
    """A diagnose command that is out: its id, the rule that asked, when and until when."""

    id: str
    rule: str
    sent: float
    deadline: float


class Diagnoses:
    """The diagnose commands out, one per node at most, kept in memory (after a restart a
    late answer is an unmatched reply: the results it sent are already with the rules)."""

    def __init__(self, state: FleetState, config: HealingSection, *, session: str, command_key: bytes) -> None:
        self.state, self.config = state, config
        self.session, self.command_key = session, command_key
        self.out: dict[NodeKey, Asked] = {}

    def request(self, rule: str, node: NodeRow, message: Result | Event, now: float, decisions: Decisions) -> None:
        """Ask ``node`` to run the diagnose profile now, unless it cannot or one is already running."""
        key = (node.cluster, node.name)
        asked = self.out.get(key)
        if asked is not None and now > asked.deadline:
            asked = self.out.pop(key)  # its answer never came: a new one may go
            self.state.audit(node.cluster, node.name, "diagnose", rule=asked.rule, outcome="failed",
                             detail=f"no answer to {asked.id} in time", now=now)
            asked = None
        why = ("node offline" if not node.online
               else f"node {node.state}: its re-vetting is the ladder's or a person's" if node.state in OUT_OF_SERVICE
               else f"a diagnosis is already running (asked by {asked.rule} at {iso(asked.sent)})" if asked
               else "")
        if why:
            self.state.audit(node.cluster, node.name, "diagnose", rule=rule, outcome="skipped", detail=why, now=now)
            return
        profile = self.config.diagnose_profile
        timeout = float(self.config.reply_timeout)
        command = signed_command(node, "diagnose", {"profile": profile}, now, session=self.session,
                                 master_key=self.command_key, expires_in=timeout)
        self.out[key] = Asked(command.id, rule, now, now + timeout)
        self.state.audit(node.cluster, node.name, "diagnose", rule=rule, outcome="sent",
                         detail=f"profile {profile} (id {command.id})", now=now)
        self.state.remember(HistoryRecord(node.cluster, node.name, now, "diagnose", message.entity, (rule,)))
        decisions.other.append(Send(command))

    def on_reply(self, reply: Reply, now: float) -> bool:
        """The node's answer to its diagnose command; False for a reply that is not one."""
        key = (reply.cluster, reply.node)
        asked = self.out.get(key)
        if asked is None or not reply.id or reply.id != asked.id:
            return False
        del self.out[key]
        self.state.audit(reply.cluster, reply.node, "diagnose", rule=asked.rule, outcome="done" if reply.ok else "failed",
                         detail=reply.message, now=now)
        return True
