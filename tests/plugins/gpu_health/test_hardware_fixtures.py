"""Fixtures recorded on real GPU nodes by ``scripts/gpu-fixtures``.

Each ``tests/data/nvidia-smi/NAME.xml`` with a ``NAME.check.json`` beside it is
one node, read twice a moment apart: by nvidia-smi (the capture) and by vetd
through NVML (the check's JSON). Replaying the capture must give the verdicts
and the stable values that vetd read live.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support.procs import run_vetd

DATA = Path(__file__).resolve().parents[2] / "data" / "nvidia-smi"
NAMES = sorted(p.name.removesuffix(".check.json") for p in DATA.glob("*.check.json")) if DATA.is_dir() else []
#: Codes that depend on the moment (load, temperature) rather than on the node.
MOMENTARY = {"temp_high", "pcie_gen_degraded", "pcie_width_degraded", "idle_temp_high", "idle_memory_used",
             "stray_processes"}
#: Metrics that do not move while a node stands idle.
STABLE = ("memory_total_mib", "pcie_gen_max", "pcie_width_max", "ecc_volatile_uncorrectable",
          "remapped_rows_uncorrectable", "driver_major", "driver_minor", "gpus_found")


def results(lines: str) -> dict[tuple[str, str], dict[str, object]]:
    found = {}
    for line in lines.splitlines():
        result = json.loads(line)
        assert {"check", "entity", "status", "codes", "metrics", "message"} <= set(result)
        found[(result["check"], result["entity"])] = result
    return found


@pytest.mark.skipif(not NAMES, reason="no fixtures from real GPU nodes yet: run scripts/gpu-fixtures on one "
                    "and keep NAME.xml and NAME.check.json in tests/data/nvidia-smi/")
@pytest.mark.parametrize("name", NAMES or ["none"])
def test_a_capture_replays_to_what_vetd_read_live(name: str) -> None:
    capture, live_file = DATA / f"{name}.xml", DATA / f"{name}.check.json"
    live = results(live_file.read_text())
    node = live[("gpu_health", "node")]
    assert node["status"] != "skip", "the fixture was recorded on a node without a working GPU"
    expected = int(node["metrics"]["gpus_found"])  # type: ignore[index]
    done = run_vetd("check", "gpu_health", "gpu_idle", "--capture", str(capture),
                    "--expect-gpus", str(expected), "--json")
    replayed = results(done.stdout)
    assert set(replayed) == set(live)
    for key, result in live.items():
        again = replayed[key]
        assert set(again["codes"]) - MOMENTARY == set(result["codes"]) - MOMENTARY, key  # type: ignore[arg-type,operator]
        for metric in STABLE:
            ours, theirs = result["metrics"].get(metric), again["metrics"].get(metric)  # type: ignore[attr-defined]
            if ours is not None and theirs is not None:
                assert math.isclose(ours, theirs, rel_tol=0.01), (key, metric, ours, theirs)
