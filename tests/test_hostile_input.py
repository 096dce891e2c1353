"""Property tests: hostile or absurd input gets one clean error, never a crash.

2,100 generated examples in all: 1,600 for the decoder (structured and raw),
300 agent configs, 200 rule files; ten times as many with HYPOTHESIS_PROFILE=nightly
(tests/support/fuzz.py).
"""

from __future__ import annotations

import math
import string
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fuzz import examples
from vetd.agent.config import load_agent_config
from vetd.agent.pluginhost import PluginError, PluginHost
from vetd.controller.rules import RuleError, parse_rules
from vetd.core import protocol
from vetd.core.configfile import ConfigError

names = st.text(alphabet=string.ascii_letters + string.digits + "_.-/", min_size=0, max_size=70)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50), st.binary(max_size=50),
)
nested = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=8)

messages = st.fixed_dictionaries(
    {"kind": st.sampled_from([*protocol.CHANNELS, "nope", ""]), "cluster": names, "node": names,
     "session": st.one_of(st.text(max_size=20), st.integers()), "seq": st.one_of(st.integers(), st.floats()),
     "ts": st.one_of(st.floats(allow_nan=True), st.text(max_size=5))},
    optional={"check": nested, "status": st.sampled_from([*protocol.STATUSES, "exploded", 3]),
              "codes": nested, "metrics": st.dictionaries(st.text(max_size=8), scalars, max_size=6),
              "message": st.one_of(st.text(max_size=100), nested), "online": nested, "labels": nested,
              "name": nested, "severity": nested, "id": nested, "action": nested, "args": nested, "v": nested},
)


def decodes_cleanly(payload: bytes) -> None:
    try:
        message = protocol.decode_from("vetd/v1/alps/node/nid001/result", payload)
    except protocol.ProtocolError:
        return
    assert isinstance(message, protocol.Result)
    assert all(isinstance(v, float) for v in message.metrics.values())


@settings(max_examples=examples(500), suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_decoder_structured_garbage(data: dict[str, Any]) -> None:
    try:
        payload = msgspec.msgpack.encode(data)
    except (TypeError, OverflowError):
        return
    decodes_cleanly(payload)


@settings(max_examples=examples(1100))
@given(st.binary(max_size=4096))
def test_decoder_random_bytes(payload: bytes) -> None:
    decodes_cleanly(payload)


def deep_result(depth: int, cluster: str = "alps") -> bytes:
    """A well-formed result whose unknown field ``x`` nests ``depth`` arrays: a decoder that skips
    unknown fields has to walk all of it (built as bytes: encoding it would recurse here)."""
    head = msgspec.msgpack.encode({"kind": "result", "cluster": cluster, "node": "nid001", "session": "s",
                                   "seq": 1, "ts": 1.0, "check": "c", "status": "pass", "x": None})
    assert head.endswith(b"\xc0")  # the None of "x", last
    return head[:-1] + b"\x91" * depth + b"\xc0"


def test_decoder_deep_nesting_huge_strings_and_nan() -> None:
    assert len(deep_result(100_000)) < protocol.MAX_PAYLOAD_BYTES  # the depth is reached, not the size limit
    with pytest.raises(protocol.ProtocolError, match="RecursionError"):
        protocol.decode_from("vetd/v1/alps/node/nid001/result", deep_result(100_000))
    for payload in (
        deep_result(100_000),
        b"\x91" * 200_000 + b"\xc0",  # 200k levels of nested arrays, complete
        b"\x91" * 200_000,  # and cut short
        msgspec.msgpack.encode({"kind": "result", "message": "x" * 10_000_000}),
        msgspec.msgpack.encode({"kind": "result", "cluster": "a", "node": "n", "session": "s", "seq": 1,
                                "ts": math.nan, "check": "c", "status": "pass", "metrics": {"t": math.nan}}),
    ):
        decodes_cleanly(payload)


toml_values = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                        st.text(alphabet=string.printable.replace('"', "").replace("\\", ""), max_size=30))
toml_keys = st.sampled_from(["interval", "jitter", "cluster", "node", "broker", "spool_limit", "bogus",
                             "required_paths", "memory_fail_fraction", "expected_gpus", "allow", "timeout"])
tables = st.sampled_from(["agent", "plugins.host", "plugins.gpu_health", "commands", "checks.x", "nope"])


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(tables, toml_keys, toml_values), max_size=6))
def test_agent_config_loader_fails_only_with_config_errors(entries: list[tuple[str, str, object]]) -> None:
    text = "".join(f"[{t}]\n{k} = {toml_literal(v)}\n" for t, k, v in entries)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_text(text)
        try:
            PluginHost(load_agent_config(path, environ={}))
        except (ConfigError, PluginError) as exc:
            assert str(path) in str(exc) or "plugin" in str(exc)


rule_values = st.one_of(scalars, st.lists(st.text(max_size=10), max_size=3), st.text(max_size=40), st.sampled_from(
    ["result.status == 'fail'", "event.name ==", "1 +", "'x' in result.codes", "has(result.metrics.t)",
     "5m", "24h", "-1", "[drain, alert]", "[heal]", "[reboot]"]))


@settings(max_examples=examples(200), suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(["name", "when", "severity", "actions", "for", "count", "within",
                                                 "per", "heal", "labels", "annotations", "bogus"]),
                                rule_values, max_size=8), max_size=4))
def test_rule_loader_fails_only_with_rule_errors(rules: list[dict[str, Any]]) -> None:
    try:
        text = msgspec.json.encode({"rules": rules}).decode()  # JSON is YAML
    except (TypeError, OverflowError):
        return
    try:
        parse_rules(text, "fuzz.yaml")
    except RuleError as exc:
        assert str(exc).startswith("fuzz.yaml")
