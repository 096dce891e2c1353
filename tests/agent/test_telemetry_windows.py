"""Telemetry windows on the node (agent/telemetry.py) and the job each GPU's window belongs to."""

from __future__ import annotations

import pytest

from vetd.agent.control import Job, NodeState, gpu_indices
from vetd.agent.telemetry import Windows


def no_job(_entity: str) -> str | None:
    return None


def test_a_window_folds_samples_into_mean_min_max_per_entity_aligned_on_the_clock() -> None:
    windows = Windows(10.0, no_job)
    assert not windows.due(1003.0)
    for t, util in ((1003.0, 10.0), (1004.0, 30.0), (1005.0, 20.0)):
        windows.add({"gpu0": {"util": util, "power": float("nan")}, "gpu1": {"util": 1.0}}, t)
    assert windows.started == 1000.0 and not windows.due(1009.9) and windows.due(1010.0)
    closed = {w.entity: w for w in windows.close()}
    gpu0 = closed["gpu0"]
    assert (gpu0.started, gpu0.length, gpu0.samples) == (1000.0, 10.0, 3)
    assert gpu0.mean == {"util": 20.0} and gpu0.minimum == {"util": 10.0} and gpu0.maximum == {"util": 30.0}
    assert closed["gpu1"].samples == 3
    assert windows.close() == []  # nothing until the next sample
    windows.add({"gpu0": {"util": 5.0}}, 1012.0)
    assert windows.started == 1010.0


def test_a_window_carries_the_job_of_most_of_its_samples() -> None:
    job = {"now": None}
    windows = Windows(10.0, lambda entity: job["now"] if entity == "gpu1" else None)
    windows.add({"gpu0": {"u": 1.0}, "gpu1": {"u": 1.0}}, 0.0)
    job["now"] = "77"
    windows.add({"gpu0": {"u": 1.0}, "gpu1": {"u": 1.0}}, 1.0)
    windows.add({"gpu0": {"u": 1.0}, "gpu1": {"u": 1.0}}, 2.0)
    closed = {w.entity: w.job_id for w in windows.close()}
    assert closed == {"gpu0": None, "gpu1": "77"}


def test_a_window_must_have_a_length() -> None:
    with pytest.raises(ValueError):
        Windows(0.0, no_job)


@pytest.mark.parametrize(("gpus", "indices"), [("0,3", {0, 3}), ("0-3,6", {0, 1, 2, 3, 6}), ("", set()),
                                               ("GPU-5ce0a1e0-0000", set()), ("x,1", {1}), ("2-1", set())])
def test_gpu_indices_read_slurm_job_gpus(gpus: str, indices: set[int]) -> None:
    assert gpu_indices(gpus) == indices


def test_each_gpu_belongs_to_the_job_that_lists_it() -> None:
    state = NodeState()
    assert state.job_on("gpu0") is None and state.job_on("node") is None
    state.jobs["10"] = Job(id="10", gpus="")
    assert state.job_on("gpu5") == "10" and state.job_on("node") == "10"  # an exclusive job names no GPUs
    state.jobs["10"] = Job(id="10", gpus="0-3")
    state.jobs["11"] = Job(id="11", gpus="4,5")
    assert [state.job_on(f"gpu{i}") for i in (0, 3, 4, 5, 6)] == ["10", "10", "11", "11", None]
    assert state.job_on("node") is None  # two jobs share the node
    state.jobs["12"] = Job(id="12", gpus="5")
    assert state.job_on("gpu5") is None  # two jobs claim it: neither is certain
