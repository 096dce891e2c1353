"""Container annotation requirements: data in the agent config, checked with a deadline."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.support.oci import system_library
from vetd.agent.config import AgentConfig, Requirement
from vetd.agent.requirements import evaluate
from vetd.core.configfile import ConfigError, convert


def check(requirements: dict[str, Requirement], annotations: dict[str, str],
          deadline: float = 5.0) -> tuple[list[str], list[str]]:
    return asyncio.run(evaluate(requirements, annotations, deadline))


def test_library_of_the_variant_must_load(tmp_path: Path) -> None:
    (tmp_path / "cuda12").mkdir()
    shutil.copy(system_library(), tmp_path / "cuda12" / "libnccl-net.so")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "libnccl-net.so").write_bytes(b"not an ELF file")
    nccl = {"com.hooks.aws_ofi_nccl.enabled": Requirement(
        description="the NCCL net plugin", params={"variant": "cuda12"},
        paths=[f"{tmp_path}/{{variant}}/libnccl-net.so"], libraries=[f"{tmp_path}/{{variant}}/libnccl-net.so"])}
    assert check(nccl, {"com.hooks.aws_ofi_nccl.enabled": "true"}) == (["com.hooks.aws_ofi_nccl.enabled"], [])
    assert check(nccl, {"com.hooks.aws_ofi_nccl.enabled": "false"}) == ([], [])
    _, problems = check(nccl, {"com.hooks.aws_ofi_nccl.enabled": "true", "com.hooks.aws_ofi_nccl.variant": "cuda13"})
    assert len(problems) == 1 and problems[0].startswith("com.hooks.aws_ofi_nccl.enabled (the NCCL net plugin): ")
    assert f"missing {tmp_path}/cuda13/libnccl-net.so" in problems[0] and "cannot load library" in problems[0]
    _, problems = check(nccl, {"com.hooks.aws_ofi_nccl.enabled": "1", "com.hooks.aws_ofi_nccl.variant": "broken"})
    assert "cannot load library" in problems[0] and "missing" not in problems[0]
    # an annotation cannot point a path elsewhere
    _, problems = check(nccl, {"com.hooks.aws_ofi_nccl.enabled": "yes", "com.hooks.aws_ofi_nccl.variant": "../x"})
    assert "is not a plain word" in problems[0]


def test_endpoints_ports_commands_and_env() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    requirements = {
        "a.enabled": Requirement(tcp=[f"127.0.0.1:{port}"], commands=[["true"]], env={"PATH": ""}),
        "b.enabled": Requirement(params={"port": str(port)}, ports_free=["{port}"]),
        "c.enabled": Requirement(commands=[["sh", "-c", "echo no provider; exit 3"]], env={"VETD_NOT_SET_X": ""}),
    }
    annotations = {"a.enabled": "true", "b.enabled": "true", "c.enabled": "true"}
    names, problems = check(requirements, annotations)
    assert names == ["a.enabled", "b.enabled", "c.enabled"]
    assert problems == [f"b.enabled: port {port} is in use",
                        "c.enabled: `sh -c echo no provider; exit 3` exited 3: no provider, VETD_NOT_SET_X is not set"]
    listener.close()
    names, problems = check(requirements, {"a.enabled": "true", "b.enabled": "true"})
    assert problems == [f"a.enabled: nothing answers on 127.0.0.1:{port} (Connect call failed "
                        f"('127.0.0.1', {port}))"]


def test_a_hanging_requirement_is_cut_at_the_deadline() -> None:
    started = time.monotonic()
    _, problems = check({"x.enabled": Requirement(commands=[["sleep", "30"]])}, {"x.enabled": "true"}, 0.3)
    assert time.monotonic() - started < 2
    assert problems == ["x.enabled: sleep did not finish within 0.27s"]


def test_requirements_are_config_data_with_defaults() -> None:
    config = convert({"hooks": {"annotations": {"site.gpfs.enabled": {"paths": ["/gpfs"]}}}},
                     AgentConfig, path="agent.toml")
    assert sorted(config.hooks.requirements()) == ["com.hooks.aws_ofi_nccl.enabled", "com.hooks.cxi.enabled",
                                                   "com.hooks.dcgm.enabled", "com.hooks.ssh.enabled",
                                                   "site.gpfs.enabled"]
    assert config.hooks.requirements()["com.hooks.dcgm.enabled"].tcp == ["127.0.0.1:5555"]
    with pytest.raises(ConfigError, match=r"hooks.annotations.*pathz"):
        convert({"hooks": {"annotations": {"x": {"pathz": []}}}}, AgentConfig, path="agent.toml")
