"""Controller config values out of range name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vetd.controller.config import load_controller_config
from vetd.core.configfile import ConfigError


@pytest.mark.parametrize(("text", "message"), [
    ("[breaker]\nmax_fraction = 1.5\n", ":2: breaker.max_fraction: Expected `float` <= 1.0"),
    ("[breaker]\nalways_allow = -4\n", ":2: breaker.always_allow: Expected `int` >= 0"),
    ("[breaker]\nmax_drains = -1\n", ":2: breaker.max_drains: Expected `int` >= 0"),
    ("[repeat]\ncount = 0\n", ":2: repeat.count: Expected `int` >= 1"),
    ("[http]\nmax_connections = 0\n", ":2: http.max_connections: Expected `int` >= 1"),
    ("[http]\nmax_body_kib = 100000\n", ":2: http.max_body_kib: Expected `int` <= 16384"),
    ("[http]\n\nheader_timeout = \"0s\"\n", ":3: http.header_timeout: must be more than 0"),
    ("[campaigns]\nmin_nodes = 2\n", ":2: campaigns.min_nodes: Expected `int` >= 3"),
    ("[campaigns]\nnodes = \"nid[01\"\n", ":2: campaigns.nodes: 'nid[01' is not a hostlist"),
    ("[campaigns]\ntest = \"-x\"\n", ":2: campaigns.test: '-x' is not a pair test name"),
    ("[campaigns]\nseconds = \"0s\"\n", ":2: campaigns.seconds: must be more than 0"),
    ("[campaigns]\nmin_nodes = 8\nmax_nodes = 4\n", ":3: campaigns.max_nodes: max_nodes (4) must be at least"),
])
def test_out_of_range_values_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_controller_config(path, environ={})
    assert f"{path}{message}" in str(caught.value)
