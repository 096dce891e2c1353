"""Where each rule stands per subject: ``for:``, ``keep_firing_for:`` and count windows.

:func:`advance` and :func:`window` are pure (Prometheus semantics, by message
time); :class:`RuleStates` keeps their results in the engine's model, whose
changes the store persists, so a restarted controller carries on where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vetd.controller.model import FleetState, NodeRow, RuleState
from vetd.controller.rules import Rule, RuleSpec
from vetd.core.protocol import Event, Result


@dataclass(frozen=True, slots=True)
class Step:
    """What one evaluation did to a rule's state for a subject."""

    #: The new state (``None``: inactive); meaningful only when ``changed``.
    state: RuleState | None = None
    changed: bool = False
    fire: bool = False
    #: When the rule resolved: since when it had been firing.
    resolved_since: float | None = None


UNCHANGED = Step()


def advance(state: RuleState | None, spec: RuleSpec, matched: bool, t: float,
            counted: Callable[[], bool]) -> Step:
    """The next state of a result rule whose condition is ``matched`` at time ``t``.

    ``counted`` records a match towards ``count``/``within`` and says whether
    enough have fallen in the window; it is called only when the rule would
    start.
    """
    if matched:
        if state is None:
            if not counted():
                return UNCHANGED
            if spec.for_:
                return Step(RuleState("pending", t), changed=True)
            return Step(RuleState("firing", t), changed=True, fire=True)
        if state.phase == "pending" and t - state.since >= spec.for_:
            return Step(RuleState("firing", t), changed=True, fire=True)
        if state.phase == "firing" and state.cleared_at is not None:
            return Step(RuleState("firing", state.since), changed=True)  # back before keep_firing_for ran out
        return UNCHANGED
    if state is None:
        return UNCHANGED
    if state.phase == "firing" and spec.keep_firing_for:
        cleared = state.cleared_at if state.cleared_at is not None else t
        if t - cleared < spec.keep_firing_for:
            if state.cleared_at is None:
                return Step(RuleState("firing", state.since, cleared), changed=True)
            return UNCHANGED
    return Step(None, changed=True, resolved_since=state.since if state.phase == "firing" else None)


def window(stamps: list[float], t: float, count: int, within: float) -> tuple[list[float], bool]:
    """Add a match at ``t`` to the ones within ``within``; True once there are ``count``.

    Reaching it empties the window: the next firing needs a fresh set of matches.
    """
    kept = [s for s in stamps if s > t - within] + [t]
    return ([], True) if len(kept) >= count else (kept, False)


class RuleStates:
    """Rule states and count windows of every (rule, node, subject)."""

    def __init__(self, state: FleetState) -> None:
        self.state = state

    def counted(self, rule: Rule, node: NodeRow, message: Result | Event) -> bool:
        """Record a match; True once ``count`` matches fall within ``within``."""
        spec = rule.spec
        if spec.count <= 1:
            return True
        per = message.entity if spec.per == "entity" else "*"
        key = (rule.name, node.cluster, node.name, f"count:{per}")
        stamps, reached = window(self.state.rule_windows.get(key, []), message.ts, spec.count, spec.within)
        self.state.save_rule_window(key, stamps)
        return reached

    def step(self, rule: Rule, node: NodeRow, message: Result | Event, subject: str, matched: bool) -> Step:
        """Advance a result rule for one subject, by message time."""
        key = (rule.name, node.cluster, node.name, subject)
        step = advance(self.state.rule_states.get(key), rule.spec, matched, message.ts,
                       lambda: self.counted(rule, node, message))
        if step.changed:
            self.state.save_rule_state(key, step.state)
        return step

    def forget(self, node: NodeRow) -> None:
        """A node back in service starts with a clean slate: its rules may fire again."""
        for key in [k for k in self.state.rule_states if k[1] == node.cluster and k[2] == node.name]:
            self.state.save_rule_state(key, None)
