"""Typed configuration files: TOML decoded into msgspec Structs.

Shared by the agent, the controller and every plugin's config table, so that a
bad file always fails the same way: ``ConfigError`` naming the file, the line
and the key (``/etc/vetd/agent.toml:12: plugins.host.min_memory_fraction: …``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

# re-exported: every config reader imports durations from here
from vetd.core.durations import Duration as Duration
from vetd.core.durations import parse_duration as parse_duration

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and why."""


def dec_hook(type_: type, value: object) -> object:
    """msgspec decode hook for config types (:class:`Duration`)."""
    if type_ is Duration:
        return parse_duration(value)
    raise NotImplementedError(f"unsupported config type {type_!r}")


def _key_path(error: msgspec.ValidationError, prefix: str) -> tuple[str, str]:
    """Turn msgspec's ``… - at `$.a.b``` into ``("prefix.a.b", message)``."""
    text = str(error)
    message, _, where = text.partition(" - at `$")
    where = where.rstrip("`").replace("[...]", "")
    keys = [part for part in re.split(r"[.\[\]]", where) if part and not part.isdigit()]
    unknown = re.search(r"unknown field `([^`]+)`", message)
    if unknown:
        keys.append(unknown.group(1))
    missing = re.search(r"missing required field `([^`]+)`", message)
    if missing:
        keys.append(missing.group(1))
    path = ".".join(part for part in [prefix, *keys] if part)
    return path, message


def find_line(text: str, key_path: str) -> int | None:
    """Best-effort line number of a dotted key in TOML ``text``.

    Finds the deepest ``[table]`` header that prefixes the key, then the key
    assignment inside it; falls back to the table header itself.
    """
    if not key_path:
        return None
    parts = key_path.split(".")
    lines = text.splitlines()
    best: int | None = None
    for split in range(len(parts), -1, -1):
        table, keys = parts[:split], parts[split:]
        header_line = 0
        if table:
            header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(map(re.escape, table)) + r"\s*\]\s*(#.*)?$")
            found = [i for i, line in enumerate(lines) if header.match(line)]
            if not found:
                continue
            header_line = found[0] + 1
        if not keys:
            best = header_line or None
            break
        assignment = re.compile(r"^\s*" + r"\s*\.\s*".join(map(re.escape, keys[:1])) + r"\s*[=.]")
        end = next(
            (i for i in range(header_line, len(lines)) if lines[i].lstrip().startswith("[")),
            len(lines),
        )
        for i in range(header_line, end):
            if assignment.match(lines[i]):
                return i + 1
        if table:
            best = header_line
            break
    return best


def where(path: Path | str, text: str, key: str) -> str:
    """``file:line: key`` (line omitted when it cannot be found)."""
    line = find_line(text, key)
    return f"{path}:{line}: {key}" if line else f"{path}: {key}"


def read_key(path: str, where_: str) -> bytes:
    """A secret from a file (at least 32 bytes, trailing newline ignored), only its owner may read it."""
    from vetd.core.files import check_private

    check_private(path, where_)
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{where_}: cannot read key file {path}: {exc.strerror or exc}") from exc
    if len(key) < 32:
        raise ConfigError(f"{where_}: key file {path} holds {len(key)} bytes; use at least 32 "
                          "(e.g. `openssl rand -hex 32 > FILE`)")
    return key


def read_text(path: Path, what: str, error: type[ConfigError] = ConfigError) -> str:
    """A config, rule or events file's text, or ``error`` naming the file: unreadable, or not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a text file (UTF-8 {what}): {exc}") from exc


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Read a TOML file, or raise :class:`ConfigError` naming the file and line."""
    text = read_text(path, "config")
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def convert(
    data: Mapping[str, Any] | Any,
    type_: type[T],
    *,
    path: Path | str,
    text: str = "",
    prefix: str = "",
) -> T:
    """Convert decoded TOML into ``type_``; a mismatch names file, line and key."""
    try:
        return msgspec.convert(data, type_, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        key, message = _key_path(exc, prefix)
        raise ConfigError(f"{where(path, text, key)}: {message}") from exc
