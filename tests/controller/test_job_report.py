"""`vetd job report`: the GSSR score, flags with evidence, the proxy without GPM, and the whole path:
a real agent on a simulated 8-GPU node → Mosquitto → controller → report, PNGs (series = stored data), HTML."""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.request
from array import array
from pathlib import Path

import pytest

from tests.controller.test_end_to_end import start_controller
from tests.support.procs import VetdProcess, run_vetd, vetd_env
from tests.support.services import Mosquitto, free_port
from tests.support.wait import wait_for
from vetd.agent.controlclient import ask
from vetd.controller.config import ReportSection
from vetd.controller.jobreport import build, gssr, text
from vetd.controller.telemetry import Series

SCENARIOS = Path(__file__).resolve().parents[2] / "packaging" / "scenarios"


def test_the_gssr_score_follows_its_formula() -> None:
    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert gssr(1.0, 1.0, 1.0) == pytest.approx(4 * (sigma(24.02) - 0.5) * (sigma(3.09 + 2.05 * math.exp(-11.45)) - 0.5))
    assert gssr(0.0, 0.9, 0.9) == 0.0 and gssr(0.9, 0.0, 0.0) == 0.0
    # what an H200 measured under a CuPy FP16 GEMM (tests/data/nvml/h200.soak.json, GPM): A .959, F .931, O .142
    assert gssr(0.9593, 0.931, 0.1418) == pytest.approx(0.893, abs=0.001)
    assert gssr(0.5, 0.5, 0.3) < gssr(0.9, 0.5, 0.3) < gssr(0.9, 0.9, 0.3)
    assert gssr(2.0, 3.0, -1.0) == gssr(1.0, 1.0, 0.0)  # fractions are held to 0..1


def series(node: str, gpu: int, n: int, **mean: float) -> Series:
    """``n`` 10 s windows of one GPU of job 7, each metric steady; the energy counter grows 4000 J a window
    (its maximum in a window 3600 J past its minimum)."""
    energy = [5000.0 + 4000.0 * i for i in range(n)]
    return Series("c1", node, f"gpu{gpu}", "telemetry_gpu", array("d", [1000.0 + 10 * i for i in range(n)]),
                  array("d", [10.0] * n), array("q", [10] * n),
                  {**{k: array("d", [v] * n) for k, v in mean.items()}, "energy_j": array("d", energy)},
                  {"energy_j": array("d", energy)}, {"energy_j": array("d", [e + 3600.0 for e in energy])})


def test_without_gpm_the_report_shows_a_labelled_proxy_never_a_score() -> None:
    data = [series("nid001", gpu, 6, utilization_pct=90.0 - 50 * (gpu == 3), power_w=400.0) for gpu in range(4)]
    report = build("7", data, None, ReportSection())
    assert report is not None
    document = report.to_json()
    assert document["job"]["score"] is None and document["job"]["score_kind"] == "proxy"
    assert document["job"]["score_proxy"] == pytest.approx((3 * 0.9 + 0.4) / 4)
    assert {g["score_kind"] for g in document["gpus"]} == {"proxy"} and document["gpus"][0]["score"] is None
    assert "not the saturation score" in document["score"]["proxy"]
    printed = text(report)
    assert "saturation score: none (no profiling metrics: GPM or DCGM)" in printed and "0.90*" in printed and "not the saturation score" in printed
    # energy from the driver's counter: 5 windows of 4000 J, plus the last window's 3600 J
    assert document["gpus"][0]["energy_j"] == pytest.approx(5 * 4000 + 3600) and \
        document["gpus"][0]["energy_from"] == "energy counter"
    [straggler] = [f for f in document["flags"] if f["kind"] == "straggler"]
    assert (straggler["gpu"], straggler["evidence"]["windows_below"], straggler["evidence"]["windows_compared"]) == (
        3, 6, 6)


def test_flags_carry_their_evidence() -> None:
    settings = ReportSection()
    gpm = {"sm_active_pct": 80.0, "sm_occupancy_pct": 40.0, "tensor_active_pct": 50.0, "utilization_pct": 97.0,
           "memory_used_pct": 60.0, "throttle_thermal_pct": 0.0, "throttle_power_pct": 0.0, "throttle_hw_pct": 0.0}
    data = [series("nid001", 0, 10, **gpm), series("nid001", 1, 10, **{**gpm, "sm_active_pct": 2.0}),
            series("nid002", 0, 10, **{**gpm, "memory_used_pct": 97.5}),
            series("nid002", 1, 10, **{**gpm, "throttle_thermal_pct": 30.0})]
    report = build("7", data, None, settings)
    assert report is not None
    flags = {(f["kind"], f["node"], f["gpu"]): f for f in report.to_json()["flags"]}
    assert set(flags) == {("idle_gpu", "nid001", 1), ("memory_nearly_full", "nid002", 0),
                          ("throttling", "nid002", 1)}
    assert flags[("idle_gpu", "nid001", 1)]["evidence"]["sm_active_pct"] == 2.0
    assert flags[("memory_nearly_full", "nid002", 0)]["evidence"]["peak_memory_used_pct"] == 97.5
    assert flags[("throttling", "nid002", 1)]["evidence"]["thermal_s"] == pytest.approx(30.0)
    assert report.score == pytest.approx(
        (3 * gssr(0.8, 0.5, 0.4) + gssr(0.02, 0.5, 0.4)) / 4)


def test_a_job_on_a_simulated_node_from_agent_to_report_figures_html_and_metrics(
        tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    scenario = tmp_path / "node.yaml"
    scenario.write_text((SCENARIOS / "job-8gpu.yaml").read_text()
                        + "timeline:\n  - {at: 6s, gpu: 5, xid: 13, message: Graphics Engine Exception}\n")
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\n[store]\npath = "state/c.db"\n'
                      f'[http]\nlisten = "127.0.0.1:{port}"\n')
    controller = start_controller(tmp_path, config, mosquitto, {})
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(
        f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\nscenario = "{scenario}"\n'
        'through_nvml = true\nkmsg = false\ntelemetry = false\n[plugins.telemetry]\ninterval = "250ms"\nwindow = "1s"\n')
    env = vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid001")
    agent = VetdProcess(["agent", "--config", str(agent_config)], tmp_path / "agent.log", env).start()
    try:
        wait_for(lambda: Path(env["VETD_CONTROL_SOCKET"]).exists(), 15, "the agent's control socket")
        wait_for(lambda: ask(env["VETD_CONTROL_SOCKET"], {"op": "job_start", "job_id": "4242", "gpus": "0-7"},
                             2)["ok"], 15, "the agent takes the job")
        started = time.time()

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()

        # the GPUs' windows and the host's are messages of their own: they may arrive in separate batches
        def both() -> str | None:
            text = metrics()
            wanted = ('vetd_gpu_sm_active_pct{gpu="3",job="4242",node="nid001"}',
                      'vetd_node_cpu_pct{job="4242",node="nid001"}')
            return text if all(line in text for line in wanted) else None

        scrape = wait_for(both, 20, "GPU and host telemetry with the job on /metrics")
        assert 'vetd_gpu_power_w{gpu="6",job="4242",node="nid001"} 75.0' in scrape

        def report() -> dict[str, object]:
            done = run_vetd("job", "report", "4242", "--config", str(config), "--json")
            return json.loads(done.stdout) if done.returncode == 0 else {}

        wait_for(lambda: report().get("job", {}).get("end", 0) > started + 8  # type: ignore[union-attr]
                 and any(f["kind"] == "xid" for f in report()["flags"]), 30,  # type: ignore[index]
                 "8 s of the job and its XID in the report")
    finally:
        agent.stop(timeout=10)
    document = report()
    job = document["job"]
    assert job["id"] == "4242" and job["nodes"] == ["nid001"] and job["gpus"] == 8  # type: ignore[index]
    assert job["from"] == "jobs table and telemetry windows"  # type: ignore[index]  # job_start made the job
    assert job["score_kind"] == "gssr" and 0.2 < job["score"] < 0.9  # type: ignore[index,operator]
    gpus = {g["gpu"]: g for g in document["gpus"]}  # type: ignore[attr-defined]
    assert sorted(gpus) == list(range(8)) and all(set(g) >= {"node", "gpu", "score", "mean"} for g in gpus.values())
    assert gpus[6]["score"] < 0.01 < gpus[3]["score"] < gpus[0]["score"]
    assert gpus[0]["mean"]["sm_active_pct"] == pytest.approx(78, abs=4)
    kinds = {(f["kind"], f["gpu"]) for f in document["flags"]}  # type: ignore[attr-defined]
    assert {("idle_gpu", 6), ("straggler", 3), ("memory_nearly_full", 2), ("xid", 5)} <= kinds
    assert ("straggler", 6) not in kinds  # idle, not straggling
    xid = next(f for f in document["flags"] if f["kind"] == "xid")  # type: ignore[attr-defined]
    assert "xid_13" in xid["evidence"]["codes"] and xid["severity"] == "warning"

    figures, page = tmp_path / "figures", tmp_path / "report.html"
    done = run_vetd("job", "report", "4242", "--config", str(config), "--png", str(figures), "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert "saturation score (GSSR)" in done.stdout and "straggler" in done.stdout
    for name in ("activity", "score"):
        assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    activity = json.loads((figures / "activity.json").read_text())
    panels = {p["metric"]: p for p in activity["panels"]}
    assert set(panels) >= {"utilization_pct", "sm_active_pct", "sm_occupancy_pct", "dram_active_pct",
                           "tensor_active_pct", "nvlink", "power_w", "memory_used_pct"}
    # the plotted series are the stored windows (vetd export reads the same database)
    exported = run_vetd("export", "--telemetry", "--job", "4242", "--config", str(config))
    stored = [json.loads(line) for line in exported.stdout.splitlines()]
    for metric in ("sm_active_pct", "tensor_active_pct"):
        for series in panels[metric]["series"]:
            mine = [w for w in stored if w["entity"] == f"gpu{series['gpu']}"]
            assert series["t"] == [w["ts"] for w in mine if metric in w["mean"]]
            assert series["y"] == [w["mean"][metric] for w in mine if metric in w["mean"]]
    score = json.loads((figures / "score.json").read_text())
    assert score["kind"] == "gssr" and len(score["series"]) == 8 and score["aggregate"]["y"]
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html and "straggler" in html
    embedded = html.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(embedded) == (figures / "activity.png").read_bytes()
    assert "src='http" not in html and "<script" not in html  # self-contained
    controller.stop(timeout=10)
