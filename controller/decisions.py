"""What the engine decides: plain records, no behaviour.

:class:`Decisions` holds two things: :attr:`~Decisions.changes`, what the
store persists in the batch's transaction (node rows, rule states, ladders,
audit rows, …), and the actions the executor carries out in the world once
that transaction has committed (Slurm, Alertmanager, a command to an agent),
off the ingest path. An action's ``audit`` is the row its outcome goes into
(its ``id`` given by the store when it wrote the row).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vetd.controller.model import Audit, Changes
from vetd.core.protocol import Command


@dataclass
class Drain:
    cluster: str
    node: str
    reason: str
    rule: str
    audit: Audit


@dataclass
class Resume:
    cluster: str
    node: str
    audit: Audit


@dataclass
class Reboot:
    cluster: str
    node: str
    reason: str
    audit: Audit


@dataclass
class Send:
    """A command to publish to a node's ``cmd`` topic."""

    command: Command

    @property
    def node(self) -> str:
        return self.command.node


@dataclass
class Alert:
    cluster: str
    node: str
    rule: str
    alerts: list[dict[str, Any]]
    #: Re-sends of alerts still firing are counted, not audited.
    resend: bool = False


Action = Drain | Resume | Reboot | Send | Alert


@dataclass
class Decisions:
    drains: list[Drain] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    #: Healing: commands to send, reboots and resumes to carry out.
    other: list[Action] = field(default_factory=list)
    #: What the store persists before any of the actions is carried out.
    changes: Changes = field(default_factory=Changes)

    def extend(self, other: Decisions) -> None:
        """Add ``other``'s actions and changes, which come after these."""
        self.drains += other.drains
        self.alerts += other.alerts
        self.other += other.other
        self.changes.update(other.changes)

    def __iter__(self) -> Iterator[Action]:
        """Drains first, then alerts, then the rest: the order they are carried out in."""
        yield from self.drains
        yield from self.alerts
        yield from self.other
