"""No false drains by default, as `vetd check` (the Slurm prolog's entry point) reports them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.procs import run_vetd, vetd_env

H200 = Path(__file__).resolve().parents[2] / "data" / "nvidia-smi" / "h200.xml"

SHARED_NODE = """\
gpus: 2
timeline:
  - {at: 0s, gpu: 1, set: {memory_used_mib: 70000, utilization_pct: 100,
                           processes: [{pid: 77, name: python, type: C}]}}
"""


def test_an_idle_air_cooled_h200_passes_gpu_idle_by_default() -> None:
    """Captured idle at 37 °C (slowdown 89 °C): the old 30 °C limit failed it, and the prolog drained."""
    done = run_vetd("check", "gpu_idle", "--capture", str(H200), "--json")
    result = json.loads(done.stdout)
    assert (result["status"], result["codes"]) == ("pass", []), result
    assert done.returncode == 0


def test_the_prolog_judges_only_the_jobs_gpus(tmp_path: Path) -> None:
    """Another job's busy GPU 1 on a shared node does not fail this job's prolog (it has GPU 0)."""
    scenario = tmp_path / "shared.yaml"
    scenario.write_text(SHARED_NODE)
    argv = ("check", "--profile", "prolog", "--scenario", str(scenario), "--json", "gpu_idle", "gpu_health")
    for variable in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        done = run_vetd(*argv, env=vetd_env(**{variable: "0"}))
        results = [json.loads(line) for line in done.stdout.splitlines()]
        idle = {r["entity"]: (r["status"], r["codes"]) for r in results if r["check"] == "gpu_idle"}
        assert idle == {"gpu0": ("pass", []), "gpu1": ("skip", ["not_this_job"])}, variable
        health = {r["entity"]: r["status"] for r in results if r["check"] == "gpu_health"}
        assert health == {"node": "pass", "gpu0": "pass", "gpu1": "skip"}
        assert done.returncode == 0, done.stdout
    whole_node = run_vetd(*argv)  # no job GPUs named: every GPU is judged
    assert whole_node.returncode == 1
