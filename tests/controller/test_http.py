"""The controller's HTTP endpoints: metrics and reads for anyone on the host, changes only with the token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.controller.test_end_to_end import start_agent, start_controller
from tests.support.procs import run_vetd
from tests.support.services import Mosquitto, free_port
from tests.support.wait import wait_for


def call(url: str, body: dict[str, object] | None = None, token: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_reads_and_token_guarded_drain(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port = free_port()
    token = "t" * 40
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\n[store]\npath = "state/c.db"\n'
                      f'[http]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{tmp_path / "token"}"\n')
    controller = start_controller(tmp_path, config, mosquitto, {})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001", '[agent]\ninterval = "1s"\n')
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: '"http_listening"' in controller.output, 10, "http up")
        wait_for(lambda: 'vetd_controller_events_total{event="results"}' in call(f"{base}/metrics")[1], 20,
                 "results counted in metrics")
        status, text = call(f"{base}/metrics")
        assert status == 200 and 'vetd_nodes{state="healthy"} 1' in text
        assert "vetd_nodes_online 1" in text
        status, nodes = call(f"{base}/api/v1/nodes")
        assert status == 200 and json.loads(nodes)[0]["node"] == "nid001"

        assert call(f"{base}/api/v1/drain", {"nodes": "nid001", "reason": "x"})[0] == 401
        assert call(f"{base}/api/v1/drain", {"nodes": "nid001", "reason": "x"}, "wrong" * 8)[0] == 401
        assert call(f"{base}/api/v1/drain", {"nodes": "nid[001", "reason": "x"}, token)[0] == 400
        status, body = call(f"{base}/api/v1/drain", {"nodes": "nid001", "reason": "fan"}, token)
        assert status == 202 and json.loads(body)["nodes"] == ["nid001"]
        wait_for(lambda: run_vetd("excluded", "--config", str(config)).stdout.strip() == "nid001", 10, "drained")
        assert call(f"{base}/nope")[0] == 404
    finally:
        agent.stop(), controller.stop()


def test_without_a_token_file_http_changes_nothing(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\n[store]\npath = "state/c.db"\n'
                      f'[http]\nlisten = "127.0.0.1:{port}"\n')
    controller = start_controller(tmp_path, config, mosquitto, {})
    try:
        wait_for(lambda: '"http_listening"' in controller.output, 10, "http up")
        status, body = call(f"http://127.0.0.1:{port}/api/v1/resume", {"nodes": "nid001"}, "anything")
        assert status == 403 and "token_file" in body
    finally:
        controller.stop()
