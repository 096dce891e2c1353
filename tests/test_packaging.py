"""What ships: the install layout and the example files in packaging/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from vetd.agent.config import load_agent_config
from vetd.agent.pluginhost import PluginHost
from vetd.controller.config import load_controller_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_configs_are_valid() -> None:
    agent = load_agent_config(ROOT / "packaging" / "config" / "agent.toml", environ={})
    assert agent.agent.cluster == "alps"
    assert PluginHost(agent).configs.typed("host", object).required_env["FI_PROVIDER"] == "cxi"  # type: ignore[attr-defined]
    controller = load_controller_config(ROOT / "packaging" / "config" / "controller.toml", environ={})
    assert controller.scheduler.backend == "slurm"


def test_the_wheel_installs_only_under_the_vetd_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("vetd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "vetd" in tops and all(top.endswith(".dist-info") for top in tops - {"vetd"})
    assert not any(name.startswith("vetd/__init__") for name in names)  # implicit namespace
    assert {"vetd/agent/protocol.py", "vetd/plugins/host.py", "vetd/controller/default_rules.yaml",
            "vetd/agent/py.typed"} <= set(names)
