"""Operator-written rule files (YAML) with CEL conditions.

A rule file::

    rules:
      - name: host-check-failed
        when: result.status == "fail" && result.check.startsWith("host_")
        severity: critical          # info | warning | critical
        actions: [drain, alert]     # any of drain, alert
        description: A host check failed on the node.

``when`` is a CEL expression over ``node`` (``name``, ``cluster``, ``state``,
``online``, ``labels``), ``fleet`` (``partition``, and ``labels``: each label's
majority value among the nodes of the node's cluster and partition that have
it, where one value is held by more than half of them) and either ``result`` (``check``, ``entity``,
``status``, ``codes``, ``metrics``, ``message``, ``duration_s``, ``profile``,
``job_id``) or ``event`` (``name``, ``entity``, ``severity``, ``codes``,
``metrics``, ``message``, ``job_id``). A rule is evaluated on results if its
condition uses ``result``, on events if it uses ``event`` (one, not both).
A condition that errors at run time (a missing metric: guard it with
``has(result.metrics.temp_c)``) does not match; the error is counted.

Every problem is reported with the file, the line, and the rule's name, and a
file with any error is rejected whole, so bad rules never replace good ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import msgspec
import yaml
from cel_expr_python import cel

from vetd.core.configfile import ConfigError, Duration, dec_hook

Severity = Literal["info", "warning", "critical"]
Action = Literal["drain", "alert", "heal", "mark_failed"]
#: Healing steps: ``gpu_reset``, ``restart_service NAME``, ``reboot``, ``revet PROFILE``.
HEAL_STEPS = ("gpu_reset", "restart_service", "reboot", "revet")

_DYN_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
_ENV_ALL = cel.NewEnv(variables={"result": _DYN_MAP, "event": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP})
_ENV_RESULT = cel.NewEnv(variables={"result": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP})
_ENV_EVENT = cel.NewEnv(variables={"event": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP})
_USES_FLEET = re.compile(r"\bfleet\b")


class RuleError(ConfigError):
    """A rule file that cannot be used; the message names file, line and rule."""


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    when: str
    severity: Severity = "warning"
    actions: list[Action] = msgspec.field(default_factory=lambda: ["alert"])
    description: str = ""
    #: Added to the alert's labels.
    labels: dict[str, str] = {}
    #: Alert annotations; ``{{ node.name }}``, ``{{ result.metrics.temp_c }}``… are filled in.
    annotations: dict[str, str] = {}
    #: Result rules: the condition must hold this long (by message time) before firing.
    for_: Duration = msgspec.field(default=Duration(0.0), name="for")
    #: Result rules: once firing, stay firing this long after the condition clears.
    keep_firing_for: Duration = Duration(0.0)
    #: Fire only after this many matches within ``within``…
    count: int = 1
    within: Duration = Duration(0.0)
    #: …counted per node, or per entity (the same GPU).
    per: Literal["node", "entity"] = "node"
    #: The healing ladder for the ``heal`` action, tried in order.
    heal: list[str] = []


@dataclass(frozen=True)
class Rule:
    spec: RuleSpec
    #: ``"result"`` or ``"event"``: the kind of message the rule looks at.
    input: str
    expression: Any
    source: str
    line: int

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    files: tuple[str, ...]

    def for_input(self, kind: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.input in (kind, "any")]

    @functools.cached_property
    def uses_fleet(self) -> bool:
        """Whether a condition reads ``fleet`` (only then is it worked out); asked once per message."""
        return any(_USES_FLEET.search(rule.spec.when) for rule in self.rules)


def _compile(expression: str) -> tuple[str, Any]:
    """Compile ``expression``; returns (input kind, compiled) or raises ``ValueError``."""
    try:
        _ENV_ALL.compile(expression)
    except RuntimeError as exc:
        raise ValueError(_cel_message(exc)) from None
    try:
        return "result", _ENV_RESULT.compile(expression)
    except RuntimeError:
        pass
    try:
        return "event", _ENV_EVENT.compile(expression)
    except RuntimeError:
        pass
    raise ValueError("a condition looks at `result` or at `event`, not both")


def _cel_message(exc: RuntimeError) -> str:
    text = str(exc).replace("INVALID_ARGUMENT: ", "").replace(" [INVALID_ARGUMENT]", "")
    return text.replace("ERROR: <input>:", "CEL error at ")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _plain(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node)) if node is not None else None


def load_rules(paths: Sequence[Path | str]) -> RuleSet:
    """Load and validate rule files; raise :class:`RuleError` on the first bad one."""
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in map(Path, paths):
        for rule in load_file(path):
            if rule.name in seen:
                raise RuleError(
                    f"{path}:{rule.line}: rule {rule.name!r}: name already used at {seen[rule.name]}"
                )
            seen[rule.name] = f"{path}:{rule.line}"
            rules.append(rule)
    return RuleSet(tuple(rules), tuple(str(p) for p in paths))


def load_file(path: Path) -> list[Rule]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"{path}: cannot read rule file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RuleError(f"{path}: not UTF-8 text: {exc}") from exc
    return parse_rules(text, str(path))


def parse_rules(text: str, source: str) -> list[Rule]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RuleError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise RuleError(f"{source}:{_line(root)}: a rule file is a mapping with a `rules:` list")
    top = {key.value: value for key, value in root.value}
    for key_node, _ in root.value:
        if key_node.value != "rules":
            raise RuleError(f"{source}:{_line(key_node)}: {key_node.value}: unknown key (expected `rules`)")
    rules_node = top.get("rules")
    if rules_node is None or _plain(rules_node) is None:
        return []
    if not isinstance(rules_node, yaml.SequenceNode):
        raise RuleError(f"{source}:{_line(rules_node)}: rules: must be a list of rules")
    return [_parse_rule(item, source) for item in rules_node.value]


def _parse_rule(node: yaml.Node, source: str) -> Rule:
    line = _line(node)
    if not isinstance(node, yaml.MappingNode):
        raise RuleError(f"{source}:{line}: each rule is a mapping with name, when, severity, actions")
    keys: dict[str, yaml.Node] = {k.value: k for k, _ in node.value}
    values: dict[str, yaml.Node] = {k.value: v for k, v in node.value}
    raw: dict[str, Any] = {key: _plain(value) for key, value in values.items()}
    label = f"rule {raw['name']!r}" if isinstance(raw.get("name"), str) else "rule"
    try:
        spec = msgspec.convert(raw, RuleSpec, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        key = where.strip("`.").split(".")[0].split("[")[0]
        for pattern in ("unknown field `", "missing required field `"):
            if pattern in message:
                key = message.split(pattern)[1].split("`")[0]
        at = _line(keys[key]) if key in keys else line
        allowed = {"actions": Action, "severity": Severity}.get(key)
        if allowed is not None and "Invalid enum value" in message:
            message += f" (expected one of: {', '.join(get_args(allowed))})"
        raise RuleError(f"{source}:{at}: {label}: {key or 'rule'}: {message}") from None
    if not spec.name.strip():
        raise RuleError(f"{source}:{line}: rule: name must not be empty")
    try:
        kind, expression = _compile(spec.when)
    except ValueError as exc:
        raise RuleError(f"{source}:{_line(values['when'])}: {label}: when: {exc}") from None

    def fail(key: str, message: str) -> RuleError:
        at = _line(keys[key]) if key in keys else line
        return RuleError(f"{source}:{at}: {label}: {key}: {message}")

    if kind == "event" and (spec.for_ or spec.keep_firing_for):
        raise fail("for" if spec.for_ else "keep_firing_for",
                   "only rules on results can wait (events are instants: use count/within)")
    if spec.count < 1:
        raise fail("count", "must be at least 1")
    if spec.count > 1 and not spec.within:
        raise fail("within", "count above 1 needs a window, e.g. within: 24h")
    if ("heal" in spec.actions) != bool(spec.heal):
        raise fail("heal", "the heal action and a heal: ladder go together")
    for step in spec.heal:
        verb, _, arg = step.partition(" ")
        if verb not in HEAL_STEPS:
            raise fail("heal", f"unknown step {step!r} (steps: {', '.join(HEAL_STEPS)})")
        if verb in ("restart_service", "revet") and not arg.strip():
            raise fail("heal", f"{verb} needs an argument, e.g. '{verb} {'nvidia-fabricmanager' if verb == 'restart_service' else 'prolog'}'")
    return Rule(spec, kind, expression, source, line)


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


def render(template: str, variables: Mapping[str, Any]) -> str:
    """Fill ``{{ a.b.c }}`` placeholders from nested mappings; unknown ones become ``""``."""

    def lookup(match: re.Match[str]) -> str:
        value: Any = variables
        for part in match.group(1).split("."):
            if not isinstance(value, Mapping) or part not in value:
                return ""
            value = value[part]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

    return _PLACEHOLDER.sub(lookup, template)


def evaluate_all(rules: Sequence[Rule], variables: Mapping[str, Any]) -> list[tuple[Rule, bool | None]]:
    """Evaluate many rules against one message, sharing one activation.

    Each verdict is True/False, or None when the condition errors (a missing
    key) or is not a boolean.
    """
    activation = _ENV_ALL.Activation(variables)
    outcomes = []
    for rule in rules:
        value = rule.expression.eval(activation)
        outcomes.append((rule, bool(value.value()) if value.type() == cel.Type.BOOL else None))
    return outcomes
