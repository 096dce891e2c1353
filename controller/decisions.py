"""What the engine decides and the executor carries out: plain records, no behaviour.

A decision is taken (and audited, with ``audit_id`` for its outcome) inside
the ingest transaction; carrying it out (Slurm, Alertmanager, a command to an
agent) happens afterwards, off the ingest path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vetd.core.protocol import Command


@dataclass
class Drain:
    cluster: str
    node: str
    reason: str
    rule: str
    audit_id: int


@dataclass
class Resume:
    cluster: str
    node: str
    audit_id: int


@dataclass
class Reboot:
    cluster: str
    node: str
    reason: str
    audit_id: int


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

    def __iter__(self) -> Iterator[Action]:
        """Drains first, then alerts, then the rest: the order they are carried out in."""
        yield from self.drains
        yield from self.alerts
        yield from self.other
