"""Fixtures: real Mosquitto, Slurm and Alertmanager, started per session or per test.

Also two rules for the whole run: a test that skips for a reason not on
ALLOWED_SKIPS fails the run, and tests marked ``slow`` get a longer timeout.

The suite runs in several processes (scripts/test: pytest-xdist, ``--dist loadgroup``), each with
its own session fixtures, temp folder, free ports and cluster names. Two groups keep tests apart:
``xdist_group("netns")`` (namespaced nodes whose throughput tests measure) and
``xdist_group("timing")`` (tests that bound a duration): a group's tests run one at a time, in one
process. Workers run at niceness WORKER_NICE, namespaced nodes at 0. The property tests' depth is a
profile (tests/support/fuzz.py).
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuzz
from tests.support.procs import TEST_PLUGINS
from tests.support.services import Alertmanager, Mosquitto, SecureMosquitto, Slurm, missing

# The scheduler-test plugin is importable in-process as it is in subprocesses.
sys.path.insert(0, str(TEST_PLUGINS))

#: The only reasons a test may skip without failing the run, each with why. Everything
#: else a test needs (Mosquitto, Slurm, Alertmanager, pynvml, the captures in tests/data)
#: is installed by scripts/test or is in the repository: its absence is a failure.
ALLOWED_SKIPS: dict[str, str] = {
    # mounting needs root (CAP_SYS_ADMIN); the spool's full-disk test runs wherever it can
    r"cannot mount a tmpfs here": "tmpfs mount needs root",
    # the no-GPU paths can only be seen on a machine without NVIDIA GPUs or CuPy
    r"this machine has NVIDIA GPUs": "GPU machine",
    r"CuPy is installed here": "CUDA machine",
    # several nodes' networks are network namespaces: building them needs root (CAP_NET_ADMIN)
    r"network namespaces need root": "netns needs root",
    # recorded on a GPU node (scripts/gpu-telemetry-fixtures); the test runs once the file is in tests/data
    r"no GPU telemetry fixture recorded yet": "GPU telemetry fixture not recorded yet",
}
#: Per-test timeout of tests marked ``slow`` (the default is ``timeout`` in pyproject.toml).
SLOW_TIMEOUT_S = 600

_unexpected_skips: list[tuple[str, str]] = []


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(re.search(allowed, reason) for allowed in ALLOWED_SKIPS):
            _unexpected_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


#: The niceness of each xdist worker (and what it starts): namespaced nodes, which measure
#: throughput, run at 0 (tests/support/netns.py node_nice) and so come first on the shared CPUs.
WORKER_NICE = 5
#: The main process's --dist, for its workers (set in pytest_configure).
DIST_ENV = "VETD_TEST_DIST"


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the main process: what its workers are to check (check_groups)
        os.environ[DIST_ENV] = str(config.getoption("dist", "no"))
    if os.environ.get("PYTEST_XDIST_WORKER") and os.getpriority(os.PRIO_PROCESS, 0) < WORKER_NICE:
        os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICE)
    try:
        fuzz.load()  # the property tests' depth: HYPOTHESIS_PROFILE (tests/support/fuzz.py)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which names each grouped item's group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    check_groups(items)


def check_groups(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` each worker's grouped items carry ``@GROUP`` (pytest-xdist adds it); without
    it the groups are silently ignored and their tests share what they must not (pytest 9 with xdist 3.8 did
    that: pyproject pins pytest below 9). A usage error, not a suite that passes by luck."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(DIST_ENV) != "loadgroup":
        return  # a worker's own --dist is "no": the main process's is passed down in the environment
    for item in items:
        if (group := item.get_closest_marker("xdist_group")) is not None and "@" not in item.nodeid:
            name = group.kwargs.get("name", group.args[0] if group.args else "")
            pytest.exit(f"{item.nodeid}: xdist_group({name!r}) is not honoured by this pytest / pytest-xdist "
                        "pair; run serially (-n 0) or install the pinned versions", pytest.ExitCode.USAGE_ERROR)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unexpected_skips:
        terminalreporter.section("skips not on the allow-list (tests/conftest.py ALLOWED_SKIPS): run fails")
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"{nodeid}: {reason}")


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


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    """One real Alertmanager for the session; tests keep apart by the ``cluster`` label."""
    _require("prometheus-alertmanager")
    server = Alertmanager(tmp_path_factory.mktemp("alertmanager")).start()
    yield server
    server.stop()


@pytest.fixture
def own_alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    """An Alertmanager for one test, which may stop and start it."""
    _require("prometheus-alertmanager")
    server = Alertmanager(tmp_path / "alertmanager").start()
    yield server
    server.stop()
