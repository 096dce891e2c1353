from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import examples
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
        Event(**BASE, name="job_start", job_id="4242", data={"user": "alice", "gpus": "0-3"}),
        Telemetry(**BASE, source="host", metrics={"load1": 0.5}),
        Telemetry(**BASE, source="telemetry_gpu", entity="gpu3", metrics={"power_w": 410.5}, window_s=10.0,
                  samples=10, min={"power_w": 300.0}, max={"power_w": 690.0}, job_id="4242"),
        Command(**BASE, id="c1", action="ping", expires=2e9),
        Reply(**BASE, id="c1", ok=True, message="pong"),
    ],
)
def test_every_message_kind_round_trips_on_its_topic(message: protocol.Message) -> None:
    topic = protocol.topic_for(message)
    assert topic == f"vetd/v1/alps/node/nid001/{protocol.channel_of(message)}"
    assert protocol.decode_from(topic, protocol.encode(message)) == message


def test_a_telemetry_window_reads_as_a_sample_to_an_older_peer_and_a_sample_as_a_window_to_a_newer() -> None:
    """Issue 18 extended Telemetry with window fields: both directions still decode."""

    class OldTelemetry(msgspec.Struct, tag="telemetry", tag_field="kind"):  # the protocol before issue 18
        cluster: str
        node: str
        session: str
        seq: int
        ts: float
        source: str
        entity: str = "node"
        metrics: dict[str, float] = {}

    window = Telemetry(**BASE, source="telemetry_gpu", entity="gpu0", metrics={"utilization_pct": 50.0},
                       window_s=10.0, samples=10, min={"utilization_pct": 0.0}, max={"utilization_pct": 100.0},
                       job_id="77")
    old = msgspec.msgpack.decode(protocol.encode(window), type=OldTelemetry)
    assert old.metrics == {"utilization_pct": 50.0} and old.entity == "gpu0"
    sample = protocol.decode(msgspec.msgpack.encode(OldTelemetry(**BASE, source="host", metrics={"load1": 1.0})))
    assert isinstance(sample, Telemetry)
    assert (sample.window_s, sample.samples, sample.min, sample.max, sample.job_id) == (0.0, 0, {}, {}, None)


@pytest.mark.parametrize("fields", [{"window_s": -1.0}, {"samples": -1}, {"min": {"x": float("nan")}},
                                    {"max": {"x": "high"}}, {"job_id": "a b"}])
def test_a_bad_telemetry_window_is_malformed(fields: dict[str, object]) -> None:
    payload = msgspec.msgpack.encode({**BASE, "kind": "telemetry", "source": "t", **fields})
    with pytest.raises(ProtocolError):
        protocol.decode(payload)


def test_unknown_fields_from_a_newer_peer_are_skipped() -> None:
    newer = {**BASE, "kind": "result", "check": "c", "status": "pass", "gpu_serial": "X1", "v": 2}
    decoded = protocol.decode(msgspec.msgpack.encode(newer))
    assert isinstance(decoded, Result) and decoded.check == "c" and decoded.v == 2


def test_event_data_is_skipped_by_an_older_peer_and_absent_from_one() -> None:
    class OldEvent(msgspec.Struct, kw_only=True, tag_field="kind", tag="event"):  # Event before `data`
        cluster: str
        node: str
        session: str
        seq: int
        ts: float
        name: str
        codes: list[str] = []
        job_id: str | None = None

    new = Event(**BASE, name="job_end", job_id="7", codes=["FAILED"], data={"state": "FAILED"})
    old = msgspec.msgpack.decode(protocol.encode(new), type=OldEvent)
    assert (old.name, old.job_id, old.codes) == ("job_end", "7", ["FAILED"])
    from_old = protocol.decode(msgspec.msgpack.encode(old))
    assert isinstance(from_old, Event) and from_old.data == {} and from_old.codes == ["FAILED"]


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


@settings(max_examples=examples(60))
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_another_exception(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode_from("vetd/v1/alps/node/nid001/result", payload)


# -- bounds (issue 12: one message must not be able to stop the controller) --

def _result(**fields: object) -> bytes:
    return msgspec.msgpack.encode({**BASE, "kind": "result", "check": "c", "status": "fail", **fields})


@pytest.mark.parametrize("fields", [
    {"seq": 2**63},  # overflowed SQLite INTEGER in the controller
    {"seq": -1},
    {"ts": float("nan")},
    {"ts": float("inf")},
    {"metrics": {"temp_c": float("nan")}},
    {"metrics": {"temp_c": float("-inf")}},
    {"node": "nid001\n"},  # `$` matched before a trailing newline
    {"cluster": "-o"},  # an option to scontrol
    {"entity": "gpu0\x1b[2J"},  # a terminal escape in a name
    {"entity": ""},
    {"check": "x" * 129},
    {"codes": ["c"] * 65},
    {"metrics": {f"m{i}": 1.0 for i in range(257)}},
    {"message": "x" * 4097},
    {"duration_s": -1.0},
    {"job_id": "1; rm -rf /"},
])
def test_a_result_outside_the_bounds_is_malformed(fields: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_from("vetd/v1/alps/node/nid001/result", _result(**fields))


def test_a_state_with_nan_started_is_malformed() -> None:
    payload = msgspec.msgpack.encode({**BASE, "kind": "state", "online": True, "started": float("nan")})
    with pytest.raises(ProtocolError):
        protocol.decode(payload)


def test_valid_name_has_no_trailing_newline_and_no_leading_dash() -> None:
    assert protocol.valid_name("nid001") and protocol.valid_name("a" * 64)
    for bad in ("nid001\n", "-o", "", "a" * 65, "nid 1", "nid/1"):
        assert not protocol.valid_name(bad), bad


_FLOAT_MAX = 1.7976931348623157e308


def _within_bounds(value: object, path: str = "") -> None:
    """Every leaf of a decoded message is inside the protocol's bounds."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, float):
        assert -_FLOAT_MAX <= value <= _FLOAT_MAX, path  # finite
    elif isinstance(value, int):
        assert -(2**63) <= value < 2**63, path
    elif isinstance(value, str):
        assert len(value) <= 4096, path
        if not path.endswith(("message", "reason", "data[]", "args[]", "labels[]")):  # names: no control characters
            assert not any(ord(ch) < 0x20 or 0x7f <= ord(ch) <= 0x9f for ch in value), path
    elif isinstance(value, list):
        assert len(value) <= 1024, path
        for item in value:
            _within_bounds(item, path + "[]")
    elif isinstance(value, dict):
        assert len(value) <= 256, path
        for key, item in value.items():
            _within_bounds(key, path + "{}")
            _within_bounds(item, path + "[]")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _within_bounds(getattr(value, name), f"{path}.{name}")


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.text(max_size=5000, alphabet="ab"),
)
_values = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=70), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=80)
_names = st.one_of(st.sampled_from(["alps", "nid001", "nid001\n", "-o", "a" * 64, "a" * 65]), st.text(max_size=8))
_fields = st.sampled_from(sorted({f for kind in (State, Result, Event, Telemetry, Command, Reply)
                                  for f in kind.__struct_fields__}))


@settings(max_examples=examples(200))
@given(kind=st.sampled_from(protocol.CHANNELS), cluster=_names, node=_names,
       seq=st.one_of(st.integers(min_value=-1, max_value=2**64 - 1), st.sampled_from([2**63 - 1, 2**63])),
       ts=st.floats(allow_nan=True, allow_infinity=True),
       extra=st.dictionaries(_fields, _values, max_size=6))
def test_any_message_that_decodes_is_within_bounds_and_round_trips(
        kind: str, cluster: str, node: str, seq: int, ts: float, extra: dict[str, object]) -> None:
    data = {**extra, "kind": kind, "cluster": cluster, "node": node, "session": "s", "seq": seq, "ts": ts}
    try:
        message = protocol.decode(msgspec.msgpack.encode(data))
    except ProtocolError:
        return
    _within_bounds(message)
    assert protocol.valid_name(message.cluster) and protocol.valid_name(message.node)
    assert 0 <= message.seq < 2**63
    assert protocol.decode(protocol.encode(message)) == message


def test_an_ack_round_trips_on_its_own_topic_only() -> None:
    from vetd.core.protocol import Ack, AckRange

    ack = Ack(cluster="alps", node="nid001", session="ctl", seq=0, ts=1.0,
              ranges=[AckRange("s1", 1, 10), AckRange("s2", 5, 5)])
    topic = protocol.ack_topic("alps", "nid001")
    assert topic == "vetd/v1/alps/ack/nid001"
    assert protocol.decode_ack(topic, protocol.encode(ack)) == ack
    for wrong_topic in ("vetd/v1/alps/ack/nid002", "vetd/v1/alps/node/nid001/ack"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_ack(wrong_topic, protocol.encode(ack))
    with pytest.raises(protocol.ProtocolError):  # not a node channel: never decoded as a message
        protocol.decode_from("vetd/v1/alps/node/nid001/ack", protocol.encode(ack))
    backwards = msgspec.structs.replace(ack, ranges=[AckRange("s1", 10, 1)])
    too_many = msgspec.structs.replace(ack, ranges=[AckRange("s1", i, i) for i in range(protocol.MAX_ACK_RANGES + 1)])
    for bad in (backwards, too_many):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_ack(topic, protocol.encode(bad))


def test_a_birth_carries_the_kernel_boot_id_and_an_older_one_without_it_decodes(tmp_path: Path) -> None:
    from vetd.agent.transport import Identity, boot_id

    assert boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    birth = Identity("alps", "nid001").state(True)
    assert birth.boot_id == boot_id() and protocol.decode_from(protocol.topic_for(birth), protocol.encode(birth)) == birth
    odd = tmp_path / "boot_id"
    odd.write_text("not a plain id\n")
    assert boot_id(str(odd)) == "" and boot_id(str(tmp_path / "absent")) == ""
    older = msgspec.msgpack.encode({"kind": "state", "v": 1, **BASE, "seq": 0, "online": True})
    assert protocol.decode_from("vetd/v1/alps/node/nid001/state", older).boot_id == ""  # type: ignore[union-attr]


def test_a_service_notice_round_trips_on_its_own_topic_only() -> None:
    from vetd.core.protocol import ServiceNotice

    notice = ServiceNotice(cluster="alps", node="nid001", session="ctl", seq=0, ts=1.0, service="drained",
                           state="excluded", reason="vetd: check-failed: gpu_health", since=0.5, breaker_open=True)
    topic = protocol.service_topic("alps", "nid001")
    assert topic == "vetd/v1/alps/service/nid001"
    assert protocol.decode_service(topic, protocol.encode(notice)) == notice
    for wrong_topic in ("vetd/v1/alps/service/nid002", "vetd/v1/beta/service/nid001"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_service(wrong_topic, protocol.encode(notice))
    with pytest.raises(protocol.ProtocolError):  # not a node channel: never decoded as a message
        protocol.decode_from("vetd/v1/alps/node/nid001/service", protocol.encode(notice))
    for bad in (msgspec.structs.replace(notice, reason="x" * 5000), msgspec.structs.replace(notice, state="On Fire")):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_service(topic, protocol.encode(bad))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_service(topic, b"\x00" * (protocol.MAX_PAYLOAD_BYTES + 1))
