from __future__ import annotations

from pathlib import Path

import pytest

from vetd.agent.config import load_agent_config
from vetd.agent.pluginhost import PluginHost
from vetd.core.configfile import ConfigError, parse_duration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[agent]\ncluster = "alps"\nintervall = "10s"\n', r"agent\.toml:3: agent\.intervall: .*unknown field"),
        ('[agent]\ninterval = "ten seconds"\n', r"agent\.toml:2: agent\.interval: expected a duration"),
        ('[agent]\n\n[plugins.host]\nrequired_paths = "/scratch"\n',
         r"agent\.toml:4: plugins\.host\.required_paths: Expected `array`, got `str`"),
        ('[plugins.host]\nmemory_warn_fraction = 0.1\nbogus = 1\n', r"agent\.toml:3: plugins\.host\.bogus"),
        ('[plugins.gpu_helth]\nx = 1\n', r"agent\.toml:1: plugins\.gpu_helth: no loaded plugin owns"),
        ('[plugins.gpu_health.event_severity]\nfatal_posion = "warning"\n',
         r"agent\.toml:2: plugins\.gpu_health\.event_severity\.fatal_posion: .*unknown field"),
        ('[plugins.gpu_health.event_severity]\nsbe_storm = "fatal"\n',
         r"agent\.toml:2: plugins\.gpu_health\.event_severity\.sbe_storm: Invalid enum value 'fatal'"),
        ('[agent]\nnode = "bad name!"\n', r"agent\.node: 'bad name!' is not a valid name"),
        ('[agent\n', r"agent\.toml: invalid TOML"),
        ('[agent]\nbroker = "amqp://x"\n', r"agent\.broker: unsupported broker scheme"),
        ('[agent]\ncluster = "alps"\nack_timeout = "100ms"\n',
         r"agent\.toml:3: agent\.ack_timeout: must be between 1s and 1h, got 0\.1s"),
        ('[agent]\nack_timeout = "soon"\n', r"agent\.toml:2: agent\.ack_timeout: expected a duration"),
    ],
)
def test_bad_config_names_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected):
        PluginHost(load_agent_config(path, environ={}))


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\ncluster = "a"\nnode = "n1"\nbroker = "mqtt://h:1"\n')
    config = load_agent_config(path, environ={"VETD_BROKER": "mqtt://127.0.0.1:2883",
                                              "VETD_CLUSTER": "alps", "VETD_NODE": "nid007"})
    assert (config.agent.cluster, config.agent.node) == ("alps", "nid007")
    assert (config.broker.host, config.broker.port) == ("127.0.0.1", 2883)


def test_node_defaults_to_the_short_hostname(tmp_path: Path) -> None:
    import socket

    config = load_agent_config(write(tmp_path, ""), environ={})
    assert config.agent.node == socket.gethostname().split(".")[0]


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600), (7, 7)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_disabled_plugin_is_not_loaded_and_its_table_is_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\ndisable_plugins = ["host"]\n[plugins.host]\nrequired_paths = []\n')
    host = PluginHost(load_agent_config(path, environ={}))
    assert "host" not in host.names()
    assert not [name for name in host.register_checks().names() if name.startswith("host_")]


def test_ack_timeout_reaches_the_transport_and_a_bad_one_stops_vetd_agent_in_one_line(tmp_path: Path) -> None:
    from tests.support.procs import run_vetd, vetd_env
    from vetd.agent.daemon import Agent

    config = load_agent_config(write(tmp_path, f'[agent]\nack_timeout = "2m"\nstate_dir = "{tmp_path}"\n'
                                               '[commands]\nallow_unsigned = true\n'), environ={})
    agent = Agent(config)
    assert agent.transport.ack_timeout == 120
    agent.spool.close()
    assert load_agent_config(None, environ={}).agent.ack_timeout == 30
    done = run_vetd("agent", "--config", str(write(tmp_path, '[agent]\nack_timeout = "2h"\n')),
                    env=vetd_env(VETD_STATE_DIR=str(tmp_path)))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"vetd: config error: {tmp_path / 'agent.toml'}:2: agent.ack_timeout: must be between 1s and 1h, got 7200s"]
