"""Silences: matchers on alert labels, like Alertmanager's.

A matcher is ``label=value``, ``label!=value``, ``label=~regex`` or
``label!~regex`` (the regex must match the whole value). A silence holds an
alert when every one of its matchers does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_MATCHER = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(=~|!~|!=|=)(.*)$")


def parse_matcher(text: str) -> tuple[str, str, str]:
    match = _MATCHER.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a matcher (label=value, label!=value, label=~regex, label!~regex)")
    label, op, value = match.groups()
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{text!r}: bad regex: {exc}") from exc
    return label, op, value


def matches(matchers: Sequence[str], labels: Mapping[str, str]) -> bool:
    for text in matchers:
        label, op, value = parse_matcher(text)
        actual = labels.get(label, "")
        if op == "=" and actual != value:
            return False
        if op == "!=" and actual == value:
            return False
        if op == "=~" and not re.fullmatch(value, actual):
            return False
        if op == "!~" and re.fullmatch(value, actual):
            return False
    return True
