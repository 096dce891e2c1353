"""What every bench shares: the machine it ran on, a check before a figure, the results file.

A bench verifies its own output (``verify``) before it prints a figure, then
``write_results(NAME, figures)`` keeps the figures with the machine's
description in ``bench/results/NAME.json``, so a regression shows as a diff.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


class BenchCheckFailed(SystemExit):
    """The bench's output is wrong: no figure is printed or written (exit status 1)."""


def verify(condition: object, what: str) -> None:
    """Stop the bench, before any figure, when ``condition`` is false."""
    if not condition:
        print(f"bench check failed: {what}", file=sys.stderr)
        raise BenchCheckFailed(1)


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and the git commit the figures belong to."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                              if line.startswith("MemTotal:")))
    except (OSError, StopIteration, ValueError):
        memory_kib = 0

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "cpu_model": model or platform.processor(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        # what else ran: on a shared host the figures are only as good as this (1, 5, 15 min)
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # a copy of the tree run elsewhere (a borrowed GPU machine): the commit it was copied from, which
        # git there cannot tell (it has no .git, or another checkout's)
        "git_commit": os.environ.get("VETD_BENCH_GIT_COMMIT") or git("rev-parse", "HEAD"),
        "git_dirty": False if os.environ.get("VETD_BENCH_GIT_COMMIT") else
        bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def write_results(name: str, figures: dict[str, Any], **parameters: Any) -> Path:
    """``bench/results/NAME.json``: the figures, the parameters they were taken with, the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "parameters": parameters, "figures": figures, "machine": machine()}
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def no_gpu_driver(*, nvidia_smi: bool = False) -> str:
    """Why a GPU bench cannot read the real driver here (NVML, and ``nvidia-smi`` when asked); empty when it can."""
    import shutil
    if nvidia_smi and shutil.which("nvidia-smi") is None:
        return "no nvidia-smi here (no NVIDIA driver)"
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install 'vetd[gpu]')"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"no NVIDIA driver here: nvmlInit: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    return "" if count else "the driver lists no GPU"
