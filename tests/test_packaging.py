"""What ships: the install layout and the example files in packaging/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import msgspec
import pytest

from tests.support.procs import run_vetd
from vetd.agent.config import AgentConfig, load_agent_config
from vetd.agent.pluginhost import PluginHost
from vetd.controller.config import BreakerSection, HttpSection, load_controller_config
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.host.config import HostConfig

# The wheel is built in the source tree (build/, vetd.egg-info): by one worker, once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("wheel")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("side", ["agent", "controller"])
def test_the_shipped_configs_are_the_generated_samples(side: str) -> None:
    """packaging/config/*.toml never drift from the structs: regenerate with `vetd config --sample SIDE`."""
    done = run_vetd("config", "--sample", side)
    assert done.returncode == 0, done.stderr
    shipped = ROOT / "packaging" / "config" / f"{side}.toml"
    assert done.stdout == shipped.read_text(), f"run: vetd config --sample {side} > {shipped.relative_to(ROOT)}"


def test_the_samples_load_to_the_defaults() -> None:
    agent = load_agent_config(ROOT / "packaging" / "config" / "agent.toml", environ={})
    defaults = AgentConfig()
    assert agent.agent == msgspec.structs.replace(defaults.agent, node=agent.agent.node)  # node: this host's name
    assert agent.commands == defaults.commands and agent.checks == {}
    configs = PluginHost(agent).configs
    assert configs.typed("host", HostConfig) == HostConfig()
    assert configs.typed("gpu_health", GpuHealthConfig) == GpuHealthConfig()
    controller = load_controller_config(ROOT / "packaging" / "config" / "controller.toml", environ={})
    assert controller.breaker == BreakerSection() and controller.scheduler.backend == "none"


def test_a_sample_documents_every_key_with_its_range() -> None:
    text = (ROOT / "packaging" / "config" / "agent.toml").read_text()
    assert "# Share of a partition" not in text  # the controller's, not here
    assert "power_cap_at_limit_fraction = 0.9" in text and "(0 to 1)" in text
    assert "[plugins.gpu_health.event_severity]" in text and "one of: critical, info, warning" in text
    assert 'interval = "1m"' in text and "# [checks.host_load]" in text


def test_the_controller_unit_leaves_room_beyond_the_http_connections() -> None:
    """Finding 8 of issue 12: clients must never take the descriptors the controller needs."""
    unit = (ROOT / "packaging" / "systemd" / "vetd-controller.service").read_text()
    limit = next(int(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith("LimitNOFILE="))
    assert limit >= 10 * HttpSection().max_connections


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip install .`` would build and install."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(ROOT)], check=False, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return next(out.glob("vetd-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable); its ``bin/``.

    vetd's dependencies come from the test environment's site-packages, added
    by a ``.pth`` line: that adds the folder but none of the ``.pth`` files in
    it, so the test environment's editable vetd stays out.
    """
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-compile", str(wheel)], check=True, capture_output=True)
    (purelib / "vetd-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_wheel_installs_only_under_the_vetd_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "vetd" in tops and all(top.endswith(".dist-info") for top in tops - {"vetd"})
    assert not any(name.startswith("vetd/__init__") for name in names)  # implicit namespace
    assert {"vetd/core/protocol.py", "vetd/plugins/host/__init__.py", "vetd/controller/default_rules.yaml",
            "vetd/agent/py.typed"} <= set(names)


def test_every_tracked_module_and_data_file_is_in_the_wheel(wheel: Path) -> None:
    """A package list kept by hand once left vetd.plugins.gpu_health out of every non-editable install."""
    tracked = subprocess.run(["git", "ls-files", "core", "agent", "plugins", "controller"], cwd=ROOT, capture_output=True,
                             text=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files")
    shipped = {name for name in tracked.stdout.splitlines()
               if name.endswith((".py", ".yaml", ".typed", ".toml", ".csv"))}
    assert shipped, "git lists no module under core/, agent/, plugins/, controller/"
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(name for name in shipped if f"vetd/{name}" not in names)
    assert not missing, f"tracked but not in the wheel (pyproject.toml packages / package-data): {missing}"


def run_installed(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VETD_CONFIG")}
    return subprocess.run([str(bin_dir / "vetd"), *args], cwd=cwd, env={**env, "VETD_LOG_LEVEL": "warning"},
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_installed_wheel_runs_from_outside_the_source_tree(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c",
                            "import vetd.agent, vetd.plugins.gpu_health.nvml, vetd.controller.service as s; print(s.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=False)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), "vetd came from the source tree"
    version = run_installed(installed, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("vetd "), version.stderr
    listed = run_installed(installed, tmp_path, "check", "--list")
    assert listed.returncode == 0, listed.stderr
    assert {"gpu_health", "gpu_idle", "host_memory"} <= {line.split()[0] for line in listed.stdout.splitlines()}
    capture = Path(__file__).resolve().parent / "data" / "nvidia-smi" / "h200.xml"
    checked = run_installed(installed, tmp_path, "check", "gpu_health", "--capture", str(capture), "--json")
    assert checked.returncode == 0, checked.stderr
    assert {json.loads(line)["entity"] for line in checked.stdout.splitlines()} == {"node", "gpu0"}
    # the XID catalog is package data: a wheel without it could not say what XID 79 is
    kmsg = Path(__file__).resolve().parent / "data" / "kmsg" / "dmesg.log"
    decoded = run_installed(installed, tmp_path, "xid", str(kmsg), "--json")
    assert decoded.returncode == 1, decoded.stderr  # a critical finding
    assert {"xid": 79, "resolution": "RESTART_BM"}.items() <= json.loads(decoded.stdout.splitlines()[-1]).items()
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"kind": "event", "ts": 100, "node": "nid001", "name": "xid", "entity": "gpu1",
                                  "severity": "critical", "codes": ["xid_79"]}) + "\n")
    replayed = run_installed(installed, tmp_path, "rules", "test", "--events", str(events), "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert any(json.loads(line)["action"] == "drain" for line in replayed.stdout.splitlines()), replayed.stdout


def test_the_installed_wheel_ships_the_sku_table_and_runs_the_compute_checks(installed: Path, tmp_path: Path) -> None:
    sku = subprocess.run([str(installed / "python"), "-c",
                          "from vetd.plugins.gpu_compute import skus; print(skus.lookup('NVIDIA H200').name)"],
                         cwd=tmp_path, capture_output=True, text=True, check=False)
    assert sku.returncode == 0 and sku.stdout.strip() == "H200", sku.stderr
    checked = run_installed(installed, tmp_path, "check", "--array-backend", "numpy", "gpu_gemm", "gpu_memtest", "--json")
    assert checked.returncode == 0, checked.stderr
    assert {json.loads(line)["status"] for line in checked.stdout.splitlines()} == {"pass"}
