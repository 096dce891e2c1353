"""Durations as config files write them (``"500ms"``, ``"10s"``, ``"5m"``), with the standard library only.

Its own module so that programs that must start fast (``vetd-oci-hook``, run by the
container runtime before every container) can read a duration without msgspec.
:mod:`vetd.core.configfile` re-exports both names.
"""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class Duration(float):
    """Seconds, written in config as a number or ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``."""


def parse_duration(value: object) -> Duration:
    """Parse a config duration; raise ``ValueError`` on anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as \"500ms\", \"10s\" or \"5m\", got {value!r}")
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {value!r}")
    return Duration(seconds)
