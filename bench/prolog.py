"""Wall time of `vetd slurm prolog` and `vetd slurm epilog` with the default profiles, on the simulator.

A real ``vetd agent`` with the shipped defaults (every built-in plugin; its
GPUs: 8 healthy H100s of a scenario served through the simulated NVML
library) and a real Mosquitto. Each run is the command slurmd would start,
with slurmd's environment (no PATH; SLURM_JOB_ID, SLURMD_NODENAME,
SLURM_JOB_USER, SLURM_JOB_GPUS): its wall time from spawn to exit, the
interpreter's start included. For comparison, the one-shot `vetd check
--profile prolog` on the same scenario (what packaging/slurm/prolog.sh ran
before), the prolog's `run` request alone (the checks in the agent) and the
command's start-up alone (no SLURM_JOB_ID: it exits 2 once started).

Checked before any figure: every prolog and epilog exited 0, the agent
published each job's prolog and epilog results with the job's id and no bad
verdict, and each job's start and end. Figures go to
bench/results/prolog.json; the last line printed is ``prolog_median_ms=…``.

    .venv/bin/python bench/prolog.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support.procs import VetdProcess, Watcher, vetd_argv, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.agent.controlclient import ask
from vetd.core.protocol import Event, Result

CLUSTER = "bench"
SCENARIO = "gpus: 8\nbase: {temp_c: 31, utilization_pct: 0}\n"
VETD = str(Path(sys.executable).with_name("vetd"))


def slurm_env(config: Path, job: int, stage: str) -> dict[str, str]:
    env = {"VETD_CONFIG": str(config), "SLURM_JOB_ID": str(job), "SLURMD_NODENAME": "nid001",
           "SLURM_JOB_USER": "alice", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7", "SLURM_SCRIPT_CONTEXT": f"{stage}_slurmd"}
    if stage == "epilog":
        env.update(SLURM_JOB_EXIT_CODE="0", SLURM_JOB_EXIT_CODE2="0:0", SLURM_JOB_DERIVED_EC="0")
    return env


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
    return time.perf_counter() - started, done


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000, 1),
            "min_ms": round(ordered[0] * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="prolog + epilog pairs (default 20)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vetd-bench-prolog-"))
    broker = Mosquitto(root / "mosquitto").start()
    (root / "h100.yaml").write_text(SCENARIO)
    sock = root / "agent.sock"
    config = root / "agent.toml"
    config.write_text(f"""\
[agent]
cluster = "{CLUSTER}"
node = "nid001"
broker = "{broker.url}"
control_socket = "{sock}"
state_dir = "{root}/state"
[commands]
allow_unsigned = true
[plugins.gpu_health]
source = "scenario"
scenario = "{root}/h100.yaml"
through_nvml = true
""")
    watcher = Watcher(broker.port, f"vetd/v1/{CLUSTER}/#")
    agent = VetdProcess(["agent", "--config", str(config)], root / "agent.log",
                        vetd_env(VETD_CONTROL_SOCKET=str(sock))).start()
    try:
        wait_for(lambda: '"event": "broker_connected"' in agent.output, 30, "the agent connected")
        wait_for(lambda: watcher.select(lambda m: isinstance(m, Result) and m.check == "gpu_health"), 30,
                 "the agent's first GPU verdicts")
        prologs, epilogs, oneshots, requests, startups = [], [], [], [], []
        for job in range(1, args.runs + 1):
            # the same command with no job: it stops right after vetd's start-up (exit 2)
            seconds, done = timed([VETD, "slurm", "prolog"], {"VETD_CONFIG": str(config)})
            verify(done.returncode == 2 and "SLURM_JOB_ID is not set" in done.stderr, f"start-up only: {done}")
            startups.append(seconds)
            seconds, done = timed([VETD, "slurm", "prolog"], slurm_env(config, job, "prolog"))
            verify(done.returncode == 0, f"prolog job {job} exited {done.returncode}: {done.stderr[-500:]}")
            prologs.append(seconds)
            seconds, done = timed([VETD, "slurm", "epilog"], slurm_env(config, job, "epilog"))
            verify(done.returncode == 0, f"epilog job {job} exited {done.returncode}: {done.stderr[-500:]}")
            epilogs.append(seconds)
            started = time.perf_counter()
            answer = ask(str(sock), {"op": "run", "profile": "prolog", "deadline": 30, "gpus": "0,1,2,3,4,5,6,7"}, 30)
            requests.append(time.perf_counter() - started)
            verify(answer["ok"], f"run request: {answer}")
            seconds, done = timed(vetd_argv("check", "--profile", "prolog", "--scenario", str(root / "h100.yaml"),
                                            "--through-nvml", "--config", str(config), "--json"),
                                  {**vetd_env(), "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"})
            verify(done.returncode == 0, f"vetd check exited {done.returncode}: {done.stderr[-500:]}")
            oneshots.append(seconds)

        # No controller acknowledges them here, so the agent sends them again after 30 s: once each.
        def results(job: int, profile: str) -> list[Result]:
            unique = {(m.session, m.seq): m for m in watcher.select(lambda m: isinstance(m, Result))
                      if isinstance(m, Result) and m.job_id == str(job) and m.profile == profile}
            return list(unique.values())

        def events(job: int, name: str) -> list[Event]:
            unique = {(m.session, m.seq): m for m in watcher.select(lambda m: isinstance(m, Event))
                      if isinstance(m, Event) and m.name == name and m.job_id == str(job)}
            return list(unique.values())

        for job in range(1, args.runs + 1):
            # one agent publishes in order: once the job's end is here, so is everything before it
            wait_for(lambda job=job: events(job, "job_end"), 30, f"job {job}'s end")
            prolog, epilog = results(job, "prolog"), results(job, "epilog")
            verify({r.check for r in prolog} >= {"gpu_health", "gpu_idle", "host_memory", "host_disk"},
                   f"job {job}'s prolog checks: {sorted({r.check for r in prolog})}")
            verify(sum(1 for r in prolog if r.check == "gpu_health" and r.entity.startswith("gpu")) == 8,
                   f"job {job}: a gpu_health verdict per GPU")
            verify({r.check for r in epilog} == {"gpu_health", "gpu_idle"}, f"job {job}'s epilog checks")
            bad = [(r.check, r.entity, r.status) for r in prolog + epilog if r.status in ("fail", "error", "timeout")]
            verify(not bad, f"job {job}: bad verdicts {bad}")
            verify(len(events(job, "job_start")) == 1 and len(events(job, "job_end")) == 1,
                   f"job {job}: one start and one end")
            verify(events(job, "job_end")[0].codes == ["completed"], f"job {job}'s end: completed")
        checks = len({(r.check, r.entity) for r in results(1, "prolog")})
    finally:
        agent.stop()
        watcher.close()
        broker.stop()
    load = Path("/proc/loadavg").read_text().split()[0]
    figures = {"vetd_slurm_prolog": summary(prologs), "vetd_slurm_epilog": summary(epilogs),
               "prolog_run_request": summary(requests), "vetd_cli_startup": summary(startups),
               "vetd_check_profile_prolog_oneshot": summary(oneshots),
               "prolog_results_per_job": checks}
    for name, figure in figures.items():
        print(f"{name}: {figure}")
    print(f"load average (1 min) at the end: {load}")
    path = write_results("prolog", figures, runs=args.runs, load_average_1min=float(load), gpus=8, source="scenario through the simulated NVML",
                         profile="prolog (default: host, gpu_health, gpu_idle; gpu_compute and nccl skip without CuPy)")
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    print(f"prolog_median_ms={figures['vetd_slurm_prolog']['median_ms']} "
          f"epilog_median_ms={figures['vetd_slurm_epilog']['median_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
