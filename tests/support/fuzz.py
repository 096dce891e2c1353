"""How deep the property tests fuzz: a Hypothesis profile, chosen by the environment.

``HYPOTHESIS_PROFILE=default`` (or unset) is the suite's depth; ``nightly`` generates ten times as many
examples per test, for a run that has the time (``HYPOTHESIS_PROFILE=nightly scripts/test -k
'hostile or protocol or isolation'``). A property test states its count at the default depth
through :func:`examples`, so the profile scales every test alike and the proportions between
them stay as chosen. tests/conftest.py loads the profile.
"""

from __future__ import annotations

import os

from hypothesis import settings

#: Profile name → how many times each test's default count it generates.
DEPTHS = {"default": 1, "nightly": 10}
ENV = "HYPOTHESIS_PROFILE"


def profile() -> str:
    name = os.environ.get(ENV) or "default"
    if name not in DEPTHS:
        raise ValueError(f"{ENV}={name!r}: expected one of {', '.join(DEPTHS)}")
    return name


def examples(default: int) -> int:
    """A property test's ``max_examples``: ``default`` at the default depth, scaled by the profile's."""
    return default * DEPTHS[profile()]


def load() -> None:
    """Register every profile (no per-example deadline: the suite runs beside real daemons, on a
    loaded machine) and load the one the environment names."""
    for name, depth in DEPTHS.items():
        settings.register_profile(name, deadline=None, max_examples=100 * depth)
    settings.load_profile(profile())
