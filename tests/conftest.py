"""Fixtures: real Mosquitto and Slurm, started per session or per test."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import TEST_PLUGINS
from tests.support.services import Mosquitto, SecureMosquitto, Slurm, missing

# The scheduler-test plugin is importable in-process as it is in subprocesses.
sys.path.insert(0, str(TEST_PLUGINS))


def _require(*programs: str) -> None:
    absent = missing(*programs)
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed (scripts/test installs them as root)")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the session; tests keep apart by cluster name."""
    _require("mosquitto")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker for one test, which may stop, restart or pause it."""
    _require("mosquitto")
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    _require("munged", "slurmctld", "slurmd", "scontrol", "sinfo")
    cluster = Slurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_name() -> str:
    """A cluster name of the test's own, so tests sharing a broker never meet."""
    return f"t{uuid.uuid4().hex[:10]}"



@pytest.fixture
def secure_mosquitto(tmp_path: Path) -> Iterator[SecureMosquitto]:
    """Mosquitto with the shipped TLS, password and ACL configuration."""
    _require("mosquitto", "mosquitto_passwd", "openssl")
    broker = SecureMosquitto(tmp_path / "secure-mosquitto").start()
    yield broker
    broker.stop()
