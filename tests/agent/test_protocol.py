from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vetd.core import protocol
from vetd.core.protocol import Command, Event, ProtocolError, Reply, Result, State, Telemetry

BASE = {"cluster": "alps", "node": "nid001", "session": "s1", "seq": 1, "ts": 1700000000.5}


@pytest.mark.parametrize(
    "message",
    [
        State(**BASE, online=True, started=1.0, labels={"gpu": "GH200"}, checks=["host_env"]),
        Result(**BASE, check="host_env", status="fail", codes=["env_missing"], metrics={"env_bad": 1.0},
               message="unset: NCCL_NET", job_id="123"),
        Event(**BASE, name="xid", severity="critical", entity="gpu3", codes=["xid_79"]),
        Telemetry(**BASE, source="host", metrics={"load1": 0.5}),
        Command(**BASE, id="c1", action="ping", expires=2e9),
        Reply(**BASE, id="c1", ok=True, message="pong"),
    ],
)
def test_every_message_kind_round_trips_on_its_topic(message: protocol.Message) -> None:
    topic = protocol.topic_for(message)
    assert topic == f"vetd/v1/alps/node/nid001/{protocol.channel_of(message)}"
    assert protocol.decode_from(topic, protocol.encode(message)) == message


def test_unknown_fields_from_a_newer_peer_are_skipped() -> None:
    newer = {**BASE, "kind": "result", "check": "c", "status": "pass", "gpu_serial": "X1", "v": 2}
    decoded = protocol.decode(msgspec.msgpack.encode(newer))
    assert isinstance(decoded, Result) and decoded.check == "c" and decoded.v == 2


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode({"kind": "result"}),
        msgspec.msgpack.encode({**BASE, "kind": "nope"}),
        msgspec.msgpack.encode({**BASE, "kind": "result", "check": "c", "status": "exploded"}),
        msgspec.msgpack.encode({**BASE, "kind": "result", "check": 5, "status": "pass"}),
        msgspec.msgpack.encode({**BASE, "kind": "result", "check": "c", "status": "pass",
                                "metrics": {"a": "b"}}),
        msgspec.msgpack.encode({**BASE, "node": "../../etc", "kind": "state", "online": True}),
        msgspec.msgpack.encode([1, 2, 3]),
        b"\x91" * 5000 + b"\x90",
        b"x" * (protocol.MAX_PAYLOAD_BYTES + 1),
    ],
)
def test_garbage_raises_the_one_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(payload)


def test_a_message_that_disagrees_with_its_topic_is_rejected() -> None:
    payload = protocol.encode(Result(**BASE, check="c", status="pass"))
    with pytest.raises(ProtocolError, match="does not match"):
        protocol.decode_from("vetd/v1/alps/node/nid002/result", payload)
    with pytest.raises(ProtocolError, match="does not match"):
        protocol.decode_from("vetd/v1/alps/node/nid001/event", payload)
    with pytest.raises(ProtocolError):
        protocol.decode_from("vetd/v1/alps/nid001/result", payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_another_exception(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode_from("vetd/v1/alps/node/nid001/result", payload)
