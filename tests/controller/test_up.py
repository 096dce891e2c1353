"""`vetd up`: the one-machine main job, with its embedded broker."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.procs import run_vetd


def test_vetd_up_runs_everything_and_shows_the_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = run_vetd("up", "--state-dir", str(state), "--interval", "1s", "--duration", "6s", timeout=90)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "broker      mqtt://127.0.0.1:" in done.stdout
    node = socket.gethostname().split(".")[0]
    table = done.stdout[done.stdout.index("nodes:"):].splitlines()
    assert table[1].split()[:2] == ["NODE", "STATE"]
    assert table[2].split()[:3] == [node, "healthy", "yes"]
    # the files it wrote serve the ordinary commands afterwards
    shown = run_vetd("node", node, "--config", str(state / "controller.toml"))
    assert shown.returncode == 0 and "host_memory" in shown.stdout
