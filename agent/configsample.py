"""A full, commented config file generated from the typed config structs.

The structs are the one place a setting's type, default, range and meaning
live: each field's ``#:`` comment is its documentation, msgspec ``Meta``
bounds its range, a ``Literal`` its choices. ``vetd config --sample agent``
prints what this module writes, and the files in ``packaging/config/`` are
kept equal to it by a test, so the shipped sample can never drift from the
defaults the code applies.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from vetd.core.configfile import Duration

_FIELD = re.compile(r"^ {4}(\w+)\s*:")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's ``#:`` comment (the lines right above it in the class body), by field name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        if (match := _FIELD.match(line)) and pending:
            docs[match.group(1)] = " ".join(pending)
        if not stripped.startswith("#"):
            pending = []
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    """reST markup out: ``x`` → `x`, :class:`~a.B` → B."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "`")


def duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Duration):
        return json.dumps(duration_text(float(value)))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, msgspec.Struct):
        return toml_value(msgspec.to_builtins(value, enc_hook=float))
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _range(kind: msgspec.inspect.Type) -> str:
    """What the type allows, in words: ``0 to 1``, ``>= 0``, ``one of: a, b``."""
    if isinstance(kind, msgspec.inspect.LiteralType):
        return "one of: " + ", ".join(map(str, kind.values))
    low, high = getattr(kind, "ge", None), getattr(kind, "le", None)
    if low is None and getattr(kind, "gt", None) is not None:
        return f"> {kind.gt:g}"  # type: ignore[attr-defined]
    if low is not None and high is not None:
        return f"{low:g} to {high:g}"
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def _default(field: msgspec.inspect.Field) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return msgspec.NODEFAULT


def table(name: str, cls: type[msgspec.Struct], *, skip: Iterable[str] = ()) -> list[str]:
    """``[name]`` with every field of ``cls`` at its default, each with its doc and range above it;
    fields that are structs become sub-tables after it. ``name`` empty: the file's top level."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    docs = field_docs(cls)
    lines = [""] if name else []
    if name and cls.__doc__ and cls.__doc__.strip():
        lines += [f"# {line}".rstrip() for line in _plain(inspect.cleandoc(cls.__doc__)).splitlines()]
    if name:
        lines.append(f"[{name}]")
    nested = []
    for field in info.fields:
        if field.name in skip:
            continue
        kind = field.type
        if isinstance(kind, msgspec.inspect.StructType):
            nested.append((field.encode_name, kind.cls))
            continue
        default = _default(field)
        doc, allowed = docs.get(field.name, ""), _range(kind)
        note = f"{doc} ({allowed})" if doc and allowed else doc or allowed
        lines += [f"# {line}" for line in textwrap.wrap(note, 100)]
        if default is None or default is msgspec.NODEFAULT:
            lines.append(f"# {_key(field.encode_name)} =   (unset)")
        else:
            lines.append(f"{_key(field.encode_name)} = {toml_value(default)}")
    for sub, sub_cls in nested:
        lines += table(f"{name}.{sub}" if name else sub, sub_cls)
    return lines


def agent_sample() -> str:
    """The whole agent config: ``[agent]``, ``[commands]``, every loaded plugin's table, a ``[checks]`` example."""
    from vetd.agent.config import (
        AgentConfig,
        AgentSection,
        CheckOverride,
        CommandsSection,
        HooksSection,
        Requirement,
        SlurmSection,
        default_profiles,
        default_requirements,
    )
    from vetd.agent.pluginhost import PluginHost

    tables = PluginHost(AgentConfig()).config_tables()
    lines = [
        "# /etc/vetd/agent.toml: every key at its default (`vetd config --sample agent` writes this file;",
        "# the structs it is generated from are the one place a setting is defined). Every key is optional.",
        "# VETD_BROKER, VETD_CLUSTER and VETD_NODE in the environment override [agent].",
    ]
    lines += table("agent", AgentSection)
    lines += table("commands", CommandsSection)
    lines += table("hooks", HooksSection, skip=("annotations",))
    lines += ["", "# What each container annotation needs from the node, checked by `vetd-oci-hook` before the",
              "# container starts. These four are the defaults: a table of the same name replaces one, a new",
              "# name adds a hook (no code). Keys of a table:"]
    for key, doc in field_docs(Requirement).items():
        lines += [f"#   {line}" for line in textwrap.wrap(f"{key}: {doc}", 98)]
    for name, requirement in default_requirements().items():
        lines += ["", f"[hooks.annotations.{_key(name)}]"]
        lines += [f"{_key(key)} = {toml_value(value)}" for key, value in msgspec.structs.asdict(requirement).items()
                  if value]
    lines += table("slurm", SlurmSection)
    lines += ["", "# Profiles made of named checks, besides the checks their plugins put in a profile (`vetd check",
              "# --list`). A profile here replaces the default of the same name; the epilog's checks look for",
              "# stray processes, GPU memory not freed and a GPU that needs a reset after the job.", "[profiles]"]
    lines += [f"{_key(name)} = {toml_value(checks)}" for name, checks in default_profiles().items()]
    for name, struct in sorted(tables.items()):
        lines += table(f"plugins.{name}", struct)
    lines += ["", "# Per-check overrides, by check name (`vetd check --list`): "
              + ", ".join(CheckOverride.__struct_fields__) + ". For example:",
              "# [checks.host_load]", "# enabled = false", '# interval = "5m"', '# timeout = "2s"']
    return "\n".join(lines).lstrip("\n") + "\n"
