"""What `vetd slurm prolog` and `vetd --help` import: Slurm runs the prolog before every job on every
node, and its wall time is mostly the interpreter's start-up. Guarded by module list, not by time
(bench/prolog.py has the figures): the path from the console script to vetd.agent.slurm imports neither
the controller nor the agent's runtime nor the plugins' machinery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Modules (and their submodules) the prolog and `vetd --help` must not import.
HEAVY = (
    # the controller: its store, model, telemetry database, rules (CEL, YAML), HTTP API, figures
    "vetd.controller.", "sqlite3", "cel_expr_python", "yaml", "starlette", "uvicorn", "prometheus_client",
    "matplotlib", "numpy",
    # the agent's runtime and the plugins' checks
    "vetd.agent.checks", "vetd.agent.commands", "vetd.agent.daemon", "vetd.agent.transport",
    "vetd.plugins.gpu_health.", "pynvml", "aiomqtt", "paho",
    # what only a daemon or a log needs
    "asyncio", "structlog", "psutil", "rich",
)
#: What the prolog does need: it is measured running, not merely imported.
NEEDED = ("vetd.agent.slurm", "vetd.agent.config", "vetd.agent.controlclient")
ALLOWED = ("vetd.controller.cli",)  # its commands are on every vetd; what they use is imported when they run

PROBE = """
import json, sys
from vetd.core.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
sys.stderr.flush()
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def imported(args: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    """Run the console script's entry point (vetd.core.cli:main) with ``args`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout.strip(), done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["code"] or 0), result["modules"], done.stderr


def heavy(modules: list[str]) -> list[str]:
    """``HEAVY`` entries ending in a dot match the package's submodules (not the package: ``vetd.controller``
    and ``vetd.plugins.gpu_health`` themselves hold commands); the others the module and its submodules."""
    return [m for m in modules if m not in ALLOWED
            and any(m.startswith(h) if h.endswith(".") else m == h or m.startswith(h + ".") for h in HEAVY)]


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ncluster = "c"\nnode = "nid001"\ncontrol_socket = "{tmp_path / "none.sock"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "VETD_"))}
    return {**env, "VETD_CONFIG": str(config), "SLURM_JOB_ID": "42", "SLURMD_NODENAME": "nid001",
            "SLURM_JOB_USER": "alice", "SLURM_JOB_GPUS": "0,1"}


@pytest.mark.parametrize("stage", ["prolog", "epilog"])
def test_the_slurm_prolog_and_epilog_import_neither_the_controller_nor_the_agent_runtime(
        slurm_env: dict[str, str], stage: str) -> None:
    code, modules, stderr = imported(["slurm", stage], slurm_env)
    # it ran to its end: no agent on that socket, so the job runs (exit 0) and the log says why
    assert code == 0 and "cannot ask vetd" in stderr, stderr
    assert set(NEEDED) <= set(modules)
    assert heavy(modules) == []


def test_vetd_help_imports_no_command_s_machinery(slurm_env: dict[str, str]) -> None:
    code, modules, stderr = imported(["--help"], slurm_env)
    assert code == 0, stderr
    assert "vetd.agent.cli" in modules and "vetd.controller.cli" in modules  # every command is listed
    assert heavy(modules) == []
    assert "vetd.agent.slurm" not in modules


def test_the_guard_sees_what_a_command_imports(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The probe is not blind: a command that does open the controller's store shows its imports."""
    config = tmp_path / "controller.toml"
    config.write_text(f'[controller]\ncluster = "c"\n[store]\npath = "{tmp_path / "none.db"}"\n')
    _, modules, _ = imported(["nodes", "--config", str(config)], slurm_env)
    assert "vetd.controller.store" in heavy(modules) and "sqlite3" in heavy(modules)
