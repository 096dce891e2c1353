"""Operator-written rule files (YAML) with CEL conditions.

A rule file::

    rules:
      - name: host-check-failed
        when: result.status == "fail" && result.check.startsWith("host_")
        severity: critical          # info | warning | critical
        actions: [drain, alert]     # any of drain, alert, heal, mark_failed, diagnose
        description: A host check failed on the node.

``when`` is a CEL expression over ``node`` (``name``, ``cluster``, ``state``,
``online``, ``labels``), ``fleet`` (``partition``, and ``labels``: each label's
majority value among the nodes of the node's cluster and partition that have
it, where one value is held by more than half of them; ``median`` and ``peers``:
per check and metric, the median of the values of the node's peers, its own left
out, and how many there are, see
:class:`~vetd.controller.model.PeerMetrics`), ``history`` (what happened to the node and
its GPUs before: ``history.gpu.incidents("24h", "xid_31")``, see
:mod:`~vetd.controller.history`) and either ``result`` (``check``, ``entity``,
``status``, ``codes``, ``metrics``, ``message``, ``duration_s``, ``profile``,
``job_id``) or ``event`` (``name``, ``entity``, ``severity``, ``codes``,
``metrics``, ``message``, ``job_id``, ``data``). A rule is evaluated on results if its
condition uses ``result``, on events if it uses ``event`` (one, not both), and
on jobs if it uses ``job`` (:class:`~vetd.controller.jobs.JobContext`: once per
node of a job that has ended, with that node's ``job_end`` as ``event``).
A condition that errors at run time (a missing metric: guard it with
``has(result.metrics.temp_c)``) does not match; the engine counts the error
per rule and alerts once per rule.

Conditions are evaluated over maps, so CEL alone would let ``result.stauts``
or ``result.metrics.temp_c > "hot"`` through, to fail on every message. Each
condition is therefore also type-checked at load time against the fields the
variables really have, declared from the wire Structs (:data:`SCHEMAS`, so the
check cannot drift from the protocol); map-valued fields (``metrics``,
``labels``) keep dynamic keys. Template placeholders are checked against the
same fields.

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

from vetd.controller import history
from vetd.controller.actions import OWN_STEPS, HealingStep
from vetd.controller.jobs import JobContext
from vetd.controller.model import NodeRow
from vetd.core.configfile import ConfigError, Duration, dec_hook, read_text
from vetd.core.protocol import Envelope, Event, Result

Severity = Literal["info", "warning", "critical"]
Action = Literal["drain", "alert", "heal", "mark_failed", "suspect", "diagnose"]

_DYN_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
# `history.node.incidents("7d")`… are functions on the history scopes (vetd.controller.history).
_FUNCTIONS = history.DECLARATIONS
_ENV_ALL = cel.NewEnv(variables={"result": _DYN_MAP, "event": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP,
                                 "job": _DYN_MAP, "history": _DYN_MAP}, functions=_FUNCTIONS)
_ENV_RESULT = cel.NewEnv(variables={"result": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP, "history": _DYN_MAP},
                         functions=_FUNCTIONS)
_ENV_EVENT = cel.NewEnv(variables={"event": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP, "history": _DYN_MAP},
                        functions=_FUNCTIONS)
#: Rules on jobs: ``job`` and the node's ``job_end`` as ``event`` (:mod:`~vetd.controller.jobs`).
_ENV_JOB = cel.NewEnv(variables={"job": _DYN_MAP, "event": _DYN_MAP, "node": _DYN_MAP, "fleet": _DYN_MAP,
                                 "history": _DYN_MAP}, functions=_FUNCTIONS)
_USES_FLEET = re.compile(r"\bfleet\b")
_USES_HISTORY = re.compile(r"\bhistory\b")
_USES_PEERS = re.compile(r"\bfleet\s*\.\s*(?:median|peers)\b")
#: What a condition names: quoted strings, and map keys taken as fields (``fleet.median.gpu_gemm.x``).
_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'')
_PEER_FIELDS = re.compile(r"\bfleet\s*\.\s*(?:median|peers)\s*\.\s*(\w+)(?:\s*\.\s*(\w+))?")

#: Envelope fields rules do not see: routing and sequencing (``ts`` they do).
_ROUTING = frozenset(f.name for f in msgspec.structs.fields(Envelope)) - {"ts"}
#: What rules see of a node (:class:`NodeRow` has more, for the store).
NODE_FIELDS = ("name", "cluster", "state", "online", "labels")


@functools.cache
def message_fields(kind: type[Result] | type[Event]) -> tuple[str, ...]:
    """The fields of a result or event that rules see."""
    return tuple(f.name for f in msgspec.structs.fields(kind) if f.name not in _ROUTING)


def message_view(message: Result | Event) -> dict[str, Any]:
    """A message as rules see it (``result`` or ``event``): its fields, an absent optional as ``""``."""
    view: dict[str, Any] = {}
    for name in message_fields(type(message)):
        value = getattr(message, name)
        view[name] = "" if value is None else list(value) if isinstance(value, list) else (
            dict(value) if isinstance(value, dict) else value)
    return view


def _cel_type(info: msgspec.inspect.Type) -> Any:
    """The CEL type of a msgspec field type (an optional is its type: absent is ``""``)."""
    mi = msgspec.inspect
    if isinstance(info, mi.UnionType):
        present = [t for t in info.types if not isinstance(t, mi.NoneType)]
        return _cel_type(present[0]) if len(present) == 1 else cel.Type.DYN
    if isinstance(info, mi.LiteralType):
        return _cel_type(mi.type_info(type(info.values[0])))
    if isinstance(info, mi.ListType):
        return cel.Type.List(_cel_type(info.item_type))
    if isinstance(info, mi.DictType):
        return cel.Type.Map(_cel_type(info.key_type), _cel_type(info.value_type))
    scalars = {mi.StrType: cel.Type.STRING, mi.FloatType: cel.Type.DOUBLE, mi.IntType: cel.Type.INT,
               mi.BoolType: cel.Type.BOOL}
    return scalars.get(type(info), cel.Type.DYN)


def _declared(root: str, kind: type[Any], names: Sequence[str]) -> dict[str, Any]:
    info = msgspec.inspect.type_info(kind)
    types = {f.name: f.type for f in info.fields}  # type: ignore[attr-defined]
    return {f"{root}.{name}": _cel_type(types[name]) for name in names}


_COMMON = {
    **_declared("node", NodeRow, NODE_FIELDS),
    # What Fleet.of gives: the node's partition and each label's majority value.
    "fleet.partition": cel.Type.STRING, "fleet.labels": cel.Type.Map(cel.Type.STRING, cel.Type.STRING),
    # What PeerMetrics.view gives: per check, per metric, the peers' median and how many peers.
    "fleet.median": cel.Type.Map(cel.Type.STRING, cel.Type.Map(cel.Type.STRING, cel.Type.DOUBLE)),
    "fleet.peers": cel.Type.Map(cel.Type.STRING, cel.Type.Map(cel.Type.STRING, cel.Type.INT)),
    # What history.SCOPES gives: the scopes its functions count on.
    **{f"history.{scope}": _DYN_MAP for scope in history.SCOPES},
}
#: Per input kind: every field a condition or template may name (``root.field``) and its CEL type.
SCHEMAS: dict[str, dict[str, Any]] = {
    "result": {**_declared("result", Result, message_fields(Result)), **_COMMON},
    "event": {**_declared("event", Event, message_fields(Event)), **_COMMON},
    "job": {**_declared("job", JobContext, tuple(f.name for f in msgspec.structs.fields(JobContext))),
            **_declared("event", Event, message_fields(Event)), **_COMMON},
}
#: The variables a rule on each kind of input sees.
_SEES = {"result": ("result", "node", "fleet"), "event": ("event", "node", "fleet"),
         "job": ("job", "event", "node", "fleet")}
# Declaring `result.status` and not `result` makes CEL's checker resolve each field as a typed
# name: a misspelling is an undeclared reference, a string compared with a number has no overload.
_TYPED_ENVS = {kind: cel.NewEnv(variables=schema, functions=_FUNCTIONS) for kind, schema in SCHEMAS.items()}
_ROOTS = ("result", "event", "node", "fleet", "job", "history")
_CHECK_ERROR = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
_UNDECLARED = re.compile(r"undeclared reference to '([\w.]+)'")
_NUMERIC_PAIR = re.compile(r"applied to '\((?:int|uint|double), (?:int|uint|double)\)'")
_HAS_FIELD = re.compile(r"\bhas\(\s*(\w+\.\w+)\s*\)")


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
    #: ``"result"``, ``"event"`` or ``"job"``: what the rule looks at.
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

    @functools.cached_property
    def uses_history(self) -> bool:
        """Whether a condition reads ``history`` (only then is a message's history put in view)."""
        return any(_USES_HISTORY.search(rule.spec.when) for rule in self.rules)

    @functools.cached_property
    def uses_peers(self) -> bool:
        """Whether a condition reads ``fleet.median`` or ``fleet.peers`` (only then are peer values kept)."""
        return any(_USES_PEERS.search(rule.spec.when) for rule in self.rules)

    @functools.cached_property
    def peer_names(self) -> frozenset[str]:
        """The checks and metrics whose peer values the engine keeps: every name (a quoted
        string, or a field after ``fleet.median.``) in a condition that reads ``fleet.median``
        or ``fleet.peers``. A check and a metric are kept when both are named."""
        names: set[str] = set()
        for rule in self.rules:
            if _USES_PEERS.search(rule.spec.when):
                names.update(a or b for a, b in _LITERAL.findall(rule.spec.when))
                names.update(name for pair in _PEER_FIELDS.findall(rule.spec.when) for name in pair if name)
        return frozenset(names)


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
    try:
        return "job", _ENV_JOB.compile(expression)
    except RuntimeError:
        pass
    raise ValueError("a condition looks at `result` or at `event`, not both (a rule on jobs looks at `job`, "
                     "and may look at `event`)")


def _check_fields(expression: str, kind: str) -> None:
    """Raise ``ValueError`` for a field the variables lack or a type error; CEL's checker does the walk."""
    schema = SCHEMAS[kind]
    # has() of a declared field is always true; the checker cannot test a field of a typed name.
    text = _HAS_FIELD.sub(lambda m: "true".ljust(len(m[0])) if m[1] in schema else m[0], expression)
    try:
        checked = _TYPED_ENVS[kind].compile(text)
    except RuntimeError as exc:
        problems = []
        for line, column, message in _CHECK_ERROR.findall(str(exc)):
            where = f"{column} of line {line}" if "\n" in expression else column
            undeclared = _UNDECLARED.search(message)
            if undeclared and undeclared[1] in _ROOTS:
                return  # the whole map (`result["status"]`): nothing to check by field
            if undeclared:
                root, _, rest = undeclared[1].partition(".")
                field = f"{root}.{rest.split('.')[0]}"
                known = ", ".join(sorted(n.partition(".")[2] for n in schema if n.startswith(f"{root}.")))
                problems.append(f"unknown field `{field}` at column {where} ({root} has: {known})")
            elif not _NUMERIC_PAIR.search(message):  # int vs double compares fine at run time
                problems.append(f"type error at column {where}: {message}")
        if problems:
            raise ValueError("; ".join(problems)) from None
        return
    returns = checked.return_type()
    if returns not in (cel.Type.BOOL, cel.Type.DYN):
        raise ValueError(f"the condition is a {returns.name().lower()}, not a bool")


def _field_known(path: str, kind: str) -> bool:
    """Whether ``{{ path }}`` names something a rule on ``kind`` sees (a map's keys are free)."""
    parts = path.split(".")
    if parts[0] not in _SEES[kind]:
        return False
    declared = SCHEMAS[kind].get(".".join(parts[:2]))
    if len(parts) == 1:
        return True
    if declared is None:
        return False
    # A map's keys are free, a map of maps' two levels of them (``fleet.median.gpu_gemm.tflops_fp16``).
    return len(parts) - 2 <= str(declared.name()).count("MAP<")


def template_problem(template: str, kind: str) -> str:
    """What is wrong with a ``{{ … }}`` template for a rule on ``kind``; ``""`` if nothing."""
    at = 0
    while (start := template.find("{{", at)) >= 0:
        end = template.find("}}", start)
        if end < 0:
            return f"unclosed `{{{{` at column {start + 1}"
        path = template[start + 2:end].strip()
        if not _PLACEHOLDER.fullmatch(template[start:end + 2]):
            return f"`{template[start:end + 2]}` is not a field placeholder like {{{{ node.name }}}}"
        if not _field_known(path, kind):
            sees = ", ".join(f"{root}.*" for root in _SEES[kind])
            return f"unknown field `{path}` (a rule on {kind}s sees {sees})"
        at = end + 2
    return ""


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
    return parse_rules(read_text(path, "rule file", RuleError), str(path))


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
        if problem := history.window_problem(spec.when):
            raise ValueError(problem)
        kind, expression = _compile(spec.when)
        _check_fields(spec.when, kind)
    except ValueError as exc:
        raise RuleError(f"{source}:{_line(values['when'])}: {label}: when: {exc}") from None

    def fail(key: str, message: str) -> RuleError:
        at = _line(keys[key]) if key in keys else line
        return RuleError(f"{source}:{at}: {label}: {key}: {message}")

    if kind != "result" and (spec.for_ or spec.keep_firing_for):
        raise fail("for" if spec.for_ else "keep_firing_for",
                   f"only rules on results can wait ({kind}s are instants: use count/within)")
    if "suspect" in spec.actions and {"drain", "heal", "mark_failed"} & set(spec.actions):
        raise fail("actions", "suspect keeps the node in service: not with drain, heal or mark_failed")
    if spec.count < 1:
        raise fail("count", "must be at least 1")
    if spec.count > 1 and not spec.within:
        raise fail("within", "count above 1 needs a window, e.g. within: 24h")
    if ("heal" in spec.actions) != bool(spec.heal):
        raise fail("heal", "the heal action and a heal: ladder go together")
    steps = healing_steps() if spec.heal else {}
    for step in spec.heal:
        verb, _, arg = step.partition(" ")
        if verb not in steps and verb not in OWN_STEPS:
            raise fail("heal", f"unknown step {step!r} (steps: {', '.join(sorted([*steps, *OWN_STEPS]))})")
        needs, example = (True, "prolog") if verb == "revet" else (
            (steps[verb].needs_arg, steps[verb].example) if verb in steps else (False, ""))
        if needs and not arg.strip():
            raise fail("heal", f"{verb} needs an argument, e.g. '{verb} {example}'")
    templates = {"description": spec.description,
                 **{f"annotations.{key}": text for key, text in spec.annotations.items()}}
    for key, template in templates.items():
        if problem := template_problem(template, kind):
            raise RuleError(f"{source}:{_template_line(values, key) or line}: {label}: {key}: {problem}")
    return Rule(spec, kind, expression, source, line)


def _template_line(values: dict[str, yaml.Node], key: str) -> int | None:
    """The line of ``description`` or of ``annotations.NAME`` in a rule's YAML."""
    top, _, sub = key.partition(".")
    node = values.get(top)
    if sub and isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if k.value == sub), node)
    return _line(node) if node is not None else None


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


def explain_error(rule: Rule, variables: Mapping[str, Any]) -> str:
    """Why ``rule`` has no verdict on ``variables`` (for the log and the alert; evaluates it again)."""
    value = rule.expression.eval(_ENV_ALL.Activation(variables))
    if value.type() == cel.Type.ERROR:
        return str(value.plain_value())
    return f"the condition gave a {value.type().name().lower()}, not a bool"


def healing_steps() -> dict[str, HealingStep]:
    """The steps a ``heal:`` ladder may name besides revet and reboot (built-ins and plugins')."""
    from vetd.controller.plugins import plugins

    return plugins().healing_steps()
