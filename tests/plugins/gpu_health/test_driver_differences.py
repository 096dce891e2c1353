"""Real-driver behaviour (issue 14, item 2), each through the live NVML code path on the simulated library.

Each test here failed before the change it covers: the simulated driver
behaves as the real one does (a GPU denied by cgroups, MIG on, a driver
without a field, a GPU lost under the event set, a reset refused while NVML
is held), and :class:`~vetd.plugins.gpu_health.nvml.NvmlSource` must read it
right.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plugins.gpu_health.test_nvml import through_nvml, write
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.evaluate import Evaluator
from vetd.plugins.gpu_health.replay import ScenarioSource

pynvml = pytest.importorskip("pynvml")


def verdicts(source: ScenarioSource, expected: int | None = None) -> list[tuple[str, str, list[str]]]:
    snapshot = through_nvml(source).snapshot()
    outcomes = Evaluator(GpuHealthConfig()).health(snapshot, expected if expected is not None
                                                   else source.expected_gpus())
    return [(o.entity, o.status, o.codes) for o in outcomes]


def test_a_gpu_denied_to_the_agent_is_skipped_not_lost(tmp_path: Path) -> None:
    """A cgroup-confined agent: the driver counts 4 GPUs, 2 of them answer NO_PERMISSION."""
    source = ScenarioSource(write(tmp_path, """
gpus: 4
timeline:
  - {at: 0s, gpu: 2, set: {no_permission: true}}
  - {at: 0s, gpu: 3, set: {no_permission: true}}
"""), at=1)
    snapshot = through_nvml(source).snapshot()
    assert [g.no_permission for g in snapshot.gpus] == [False, False, True, True]
    assert not any(g.lost for g in snapshot.gpus)
    got = verdicts(source)
    assert got == [("node", "pass", []), ("gpu0", "pass", []), ("gpu1", "pass", []),
                   ("gpu2", "skip", ["no_permission"]), ("gpu3", "skip", ["no_permission"])]
    node = Evaluator(GpuHealthConfig()).count(snapshot, 4)
    assert node.metrics["gpus_no_permission"] == 2.0 and "gpus_lost" not in node.metrics
    idle = Evaluator(GpuHealthConfig()).idle(snapshot)
    assert [(o.entity, o.status, o.codes) for o in idle][2:] == [("gpu2", "skip", ["no_permission"]),
                                                                ("gpu3", "skip", ["no_permission"])]
