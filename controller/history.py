"""``history`` in rules: what happened to a node and its GPUs, counted in a window (no I/O).

A condition counts the records of :class:`~vetd.controller.model.NodeHistory` through
functions on ``history.node`` (the whole node) and ``history.gpu`` (the GPU, or other
entity, the message is about)::

    event.name == "xid" && "xid_31" in event.codes && history.gpu.incidents("24h", "xid_31") >= 1
    result.status == "fail" && history.node.remediations("7d") >= 5
    event.codes.exists(c, c.startsWith("xid_") && history.gpu.remediated("30d", c) >= 2)

Each function takes a window (a duration, ``"90m"``, ``"24h"``, ``"7d"``, at most
``[history] keep``) and, optionally, a tag; it counts the records of its kind from that
long before the message on, with that tag if one is given. Times are the controller's
(in a replay, each line's): a node whose clock is off can neither hide a record nor forge
one. The message being judged is not in them yet: a rule sees what came before it.

* ``incidents``: messages that made at least one rule fire (tags: the rules that fired,
  the check or event name, the message's codes);
* ``remediations``: healing-ladder steps with their outcome (tags: the step, ``gpu_reset``,
  ``reboot``, ``restart_service``, ``revet``…; the outcome, ``healed`` (re-vetting passed
  after it), ``revet_failed`` (carried out, re-vetting failed) or ``failed`` (not carried
  out); the ladder's rule); ``resets``: the ``gpu_reset`` steps carried out;
* ``reboots``: births with a kernel boot id other than the node's previous one;
  ``sessions``: births of a new agent session (a reboot or an agent restart);
* ``drains``: the controller's drain decisions (tags: the rule, or ``operator``);
  ``resumes``: returns to service (tags: ``vetd``, ``operator``);
* ``diagnoses``: ``diagnose`` actions sent (tags: the rule);
* ``remediated(window, tag)``: how many times incidents tagged ``tag`` were followed by a
  reboot or a remediation carried out: the same XID back after two successful reboots is
  ``history.gpu.remediated("30d", "xid_79") >= 2`` on its third occurrence, and a burst of
  them with no reboot in between counts none.

``history.gpu`` counts what happened to the message's entity (``gpu3``): its incidents,
drains and diagnoses, and the remediations and reboots of that GPU or of the whole node
(a reboot or ``gpu_reset`` of every GPU resets it too). For a message about the node
itself it counts nothing.

The functions are bound once, in the rules' CEL environment; what they count is the
:class:`HistoryView` the engine puts in place around each message's evaluation
(:func:`viewing`).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from cel_expr_python import cel

from vetd.controller.model import HistoryRecord, NodeHistory, NodeKey
from vetd.core.durations import parse_duration

#: The function of each kind, as a condition names it.
COUNTS = {"incidents": "incident", "remediations": "remediation", "resets": "remediation", "reboots": "reboot",
          "sessions": "session", "drains": "drain", "resumes": "resume", "diagnoses": "diagnose"}
#: Every function on ``history.node`` / ``history.gpu``.
FUNCTIONS = (*COUNTS, "remediated")
#: Kinds that act on every GPU of the node when they are about the whole node.
_NODE_WIDE = frozenset({"remediation", "reboot"})
#: Remediation outcomes (tags); ``failed`` is a step that was not carried out.
HEALED, REVET_FAILED, FAILED = "healed", "revet_failed", "failed"
#: Where a condition names a history function with a literal window (checked when rules load), and
#: whether the call ends there (``remediated`` needs a tag).
_LITERAL_WINDOW = re.compile(r"""\bhistory\s*\.\s*(?:node|gpu)\s*\.\s*(\w+)\s*\(\s*(?:"([^"]*)"|'([^']*)')(\s*\))?""")
#: What rules see as ``history``: the two scopes the functions are called on.
SCOPES: dict[str, dict[str, str]] = {"node": {"scope": "node"}, "gpu": {"scope": "gpu"}}


@dataclass(frozen=True, slots=True)
class HistoryView:
    """One message's look at its node's history: the node's records (oldest first), the
    entity the message is about (``""``: the node) and its time; what was counted for it
    (several rules often ask the same)."""

    records: list[HistoryRecord]
    entity: str
    now: float
    keep: float
    counted: dict[tuple[str, str, str, str | None], int] = field(default_factory=dict)

    def since(self, scope: str, window: str) -> list[HistoryRecord]:
        """The scope's records in ``window`` before the message, oldest first."""
        seconds = _window(window)
        if seconds > self.keep:
            raise ValueError(f"history window {window!r} is longer than [history] keep "
                             f"({self.keep / 86400:g}d): records that old are not kept")
        records = self.records[bisect.bisect_right(self.records, self.now - seconds, key=_ts):]
        if scope == "node":
            return records
        entity = self.entity
        if not entity:
            return []
        return [r for r in records if r.entity == entity or (not r.entity and r.kind in _NODE_WIDE)]


def _ts(record: HistoryRecord) -> float:
    return record.ts


_VIEW: ContextVar[HistoryView | None] = ContextVar("vetd_history_view", default=None)


@contextlib.contextmanager
def viewing(history: NodeHistory, node: NodeKey, entity: str, now: float) -> Iterator[None]:
    """Let ``history`` functions evaluated in this block count ``node``'s records, for a
    message about ``entity`` at ``now``."""
    token = _VIEW.set(HistoryView(history.of(node), "" if entity == "node" else entity, now, history.keep))
    try:
        yield
    finally:
        _VIEW.reset(token)


@functools.lru_cache(maxsize=256)
def _window(window: str) -> float:
    try:
        seconds = float(parse_duration(window))
    except ValueError:
        raise ValueError(f"history window {window!r}: expected a duration such as \"90m\", \"24h\" or \"7d\"") \
            from None
    if seconds <= 0:
        raise ValueError(f"history window {window!r} must be longer than 0")
    return seconds


def _view() -> HistoryView:
    view = _VIEW.get()
    if view is None:
        raise ValueError("history is only counted while the controller judges a message")
    return view


def count(function: str, scope: str, window: str, tag: str | None = None) -> int:
    """What ``history.<scope>.<function>(window[, tag])`` gives for the message in view."""
    view = _view()
    key = (function, scope, window, tag)
    if (known := view.counted.get(key)) is not None:
        return known
    records = view.since(scope, window)
    if function == "remediated":
        times = _remediated(records, tag or "")
    else:
        kind = COUNTS[function]
        times = sum(1 for r in records if r.kind == kind and (tag is None or tag in r.tags)
                    and (function != "resets" or ("gpu_reset" in r.tags and FAILED not in r.tags)))
    view.counted[key] = times
    return times


def _remediated(records: list[HistoryRecord], tag: str) -> int:
    """How many times incidents tagged ``tag`` were followed by a reboot or a remediation carried out."""
    times, pending = 0, False
    for record in records:
        if record.kind == "incident" and tag in record.tags:
            pending = True
        elif pending and (record.kind == "reboot" or (record.kind == "remediation" and FAILED not in record.tags)):
            times, pending = times + 1, False
    return times


def _impl(function: str, tagged: bool) -> Callable[..., int]:
    if tagged:
        return lambda scope, window, tag: count(function, _scope(scope), window, tag)
    return lambda scope, window: count(function, _scope(scope), window)


def _scope(receiver: Any) -> str:
    scope = receiver.get("scope") if isinstance(receiver, dict) else None
    if scope not in SCOPES:
        raise ValueError("history functions are called on history.node or history.gpu")
    return str(scope)


_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
#: The CEL declarations (with their implementations) of every history function.
DECLARATIONS = [
    cel.FunctionDecl(name, [
        *([] if name == "remediated" else [cel.Overload(
            f"vetd_history_{name}", cel.Type.INT, [_MAP, cel.Type.STRING], is_member=True, impl=_impl(name, False))]),
        cel.Overload(f"vetd_history_{name}_tag", cel.Type.INT, [_MAP, cel.Type.STRING, cel.Type.STRING],
                     is_member=True, impl=_impl(name, True)),
    ])
    for name in FUNCTIONS
]


def window_problem(expression: str) -> str:
    """What is wrong with a literal window a condition gives a history function; ``""`` if nothing."""
    for match in _LITERAL_WINDOW.finditer(expression):
        function, window = match[1], match[2] if match[2] is not None else match[3]
        if function not in FUNCTIONS:
            return f"unknown history function `{function}` (history.node and history.gpu have: {', '.join(FUNCTIONS)})"
        try:
            _window(window)
        except ValueError as exc:
            return str(exc)
        if function == "remediated" and match[4]:
            return 'remediated needs a tag besides the window, e.g. history.gpu.remediated("30d", "xid_79")'
    return ""
