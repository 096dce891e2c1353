"""The vetd wire protocol: topics and MessagePack-encoded msgspec Structs.

The agent owns this contract; the controller imports it. Rules that keep old
and new peers talking:

* every message is one member of a tagged union (field ``kind``);
* new fields always get defaults, and no field ever changes its type;
* decoders skip unknown fields, so a newer agent can talk to an older controller.

Topics are ``vetd/v1/<cluster>/node/<node>/<channel>`` with channel one of
``state`` (retained birth / Last Will), ``result``, ``event``, ``telemetry``,
``cmd`` (controller → agent) and ``reply`` (agent → controller).

Acknowledgements go controller → agent on ``vetd/v1/<cluster>/ack/<node>``,
outside the ``node/`` tree on purpose: the controller's subscription
(:func:`subscription`, ``node/+/+``) never brings it its own acks back, and
a node topic can never carry one (:func:`parse_topic` knows no ``ack``
channel), so an ack is only ever read by :func:`decode_ack`.

Whether the controller has a node in service goes controller → agent on
``vetd/v1/<cluster>/service/<node>``, retained (QoS 1), outside the
``node/`` tree for the same reasons: a :class:`ServiceNotice` saying
``in_service``, ``excluded`` or ``drained``, with the controller's node state
and reason. The controller publishes it when any of those change and again
after it (re)connects; a new agent gets the retained one on subscribing.
Only :func:`decode_service` reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from typing import Annotated, Final, Literal, TypeVar

import msgspec

SCHEMA_VERSION: Final = 1
TOPIC_ROOT: Final = "vetd/v1"

#: Largest payload either side accepts; anything bigger is dropped unread.
MAX_PAYLOAD_BYTES: Final = 256 * 1024

Status = Literal["pass", "warn", "fail", "error", "timeout", "skip"]
#: Statuses that make a node unfit (``vetd check`` exits 1 on these).
BAD_STATUSES: Final[frozenset[str]] = frozenset({"fail", "error", "timeout"})
STATUSES: Final[tuple[str, ...]] = ("pass", "warn", "fail", "error", "timeout", "skip")

Channel = Literal["state", "result", "event", "telemetry", "cmd", "reply"]
CHANNELS: Final[tuple[str, ...]] = ("state", "result", "event", "telemetry", "cmd", "reply")

# Bounds on everything a peer sends. A message outside them fails decoding
# (``ProtocolError``: counted as malformed), so nothing after the decoder sees
# NaN, an integer SQLite cannot hold, a name with a newline or a million
# entries. msgspec applies ``pattern`` with ``re.search``: every pattern is
# anchored with ``\A``/``\Z`` (``$`` would let a trailing newline through).

#: Cluster and node names end up in topics, Slurm arguments and file names:
#: a letter or digit first (never an option such as ``-o``), at most 64.
NAME_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
_NAME = re.compile(NAME_PATTERN)
#: Check, entity, code, metric and label names: 1-128 characters, no control
#: characters (C0, DEL, C1: nothing a terminal would act on).
_IDENT_PATTERN = r"\A[^\x00-\x1f\x7f-\x9f]{1,128}\Z"
#: Session and command ids: letters, digits, ``_.:-``.
_ID_PATTERN = r"\A[A-Za-z0-9_.:-]{0,128}\Z"
_FLOAT_MAX = sys.float_info.max

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Ident = Annotated[str, msgspec.Meta(pattern=_IDENT_PATTERN)]
_ID = re.compile(_ID_PATTERN)
Id = Annotated[str, msgspec.Meta(pattern=_ID_PATTERN)]
#: Free text (messages, reasons): bounded, shown only through the output helper that strips escapes.
Text = Annotated[str, msgspec.Meta(max_length=4096)]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
#: Any finite float (no NaN, no infinity).
Finite = Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
#: A Unix time or a duration: finite and not negative.
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=_FLOAT_MAX)]
#: Fits a signed 64-bit integer column (SQLite INTEGER).
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Codes = Annotated[list[Ident], msgspec.Meta(max_length=64)]
Metrics = Annotated[dict[Ident, Finite], msgspec.Meta(max_length=256)]
Labels = Annotated[dict[Ident, ShortText], msgspec.Meta(max_length=64)]
Args = Annotated[dict[Ident, ShortText], msgspec.Meta(max_length=32)]
#: A job id (Slurm's ``1234``, ``1234_7`` of an array, ``1234+1`` of a het job); may be empty.
JOB_ID_PATTERN: Final = r"\A[A-Za-z0-9_.:+-]{0,64}\Z"
JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_PATTERN)]
#: Most bytes a command's or reply's ``body`` holds (a campaign's pair-round message).
MAX_BODY_BYTES: Final = 128 * 1024
Body = Annotated[bytes, msgspec.Meta(max_length=MAX_BODY_BYTES)]


class ProtocolError(ValueError):
    """A payload or topic that is not a valid vetd message."""


class Envelope(msgspec.Struct, kw_only=True, tag_field="kind", omit_defaults=True):
    """Fields every message carries."""

    v: Annotated[int, msgspec.Meta(ge=0, le=65535)] = SCHEMA_VERSION
    cluster: Name
    node: Name
    #: Per-boot (per agent start) session id; ``seq`` restarts with it.
    session: Id
    #: Per-session sequence number: deduplication and loss detection.
    seq: Seq
    #: Unix time, seconds, when the message was made.
    ts: Seconds


class State(Envelope, tag="state"):
    """Retained node state: the birth on connect, the Last Will on loss."""

    online: bool
    #: When this session started; a death from an older session never wins.
    started: Seconds = 0.0
    agent_version: Annotated[str, msgspec.Meta(max_length=64)] = ""
    reason: Text = ""
    labels: Labels = {}
    checks: Annotated[list[Ident], msgspec.Meta(max_length=1024)] = []
    #: Messages the agent had to drop (spool full), by kind, since its spool was made.
    dropped: Annotated[dict[Ident, Seq], msgspec.Meta(max_length=64)] = {}
    #: The kernel's boot id (``/proc/sys/kernel/random/boot_id``): a new one is a reboot, a new
    #: session with the same one an agent restart (the controller's ``history.node.reboots``).
    boot_id: Id = ""


class Result(Envelope, tag="result"):
    """One check's verdict on one entity (the node, ``gpu0``, a NIC…)."""

    check: Ident
    status: Status
    entity: Ident = "node"
    codes: Codes = []
    #: Named measurements, units in the name (``temp_c``, ``busbw_gbps``).
    metrics: Metrics = {}
    message: Text = ""
    duration_s: Seconds = 0.0
    profile: Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9_.-]{0,64}\Z")] = ""
    job_id: JobId | None = None


class Event(Envelope, tag="event"):
    """Something that happened (an XID, a container start), not a polled check."""

    name: Ident
    severity: Literal["info", "warning", "critical"] = "info"
    entity: Ident = "node"
    codes: Codes = []
    metrics: Metrics = {}
    message: Text = ""
    job_id: JobId | None = None
    #: Structured details, free text by name (``job_start``: ``user``, ``gpus``; ``job_end``:
    #: ``state``; see :mod:`vetd.core.jobs`). Added after version 1: an older peer skips it.
    data: Annotated[dict[Ident, Text], msgspec.Meta(max_length=32)] = {}


class Telemetry(Envelope, tag="telemetry"):
    """A sample, or a window of samples, from one telemetry source about one entity.

    A source sampled without a window sends each sample as ``metrics``. A
    windowed source (``TelemetrySource(window=...)``) sends one message per
    window: ``metrics`` holds each metric's mean over the window (what an older
    reader of ``metrics`` takes for a sample), ``min`` and ``max`` its extremes,
    ``samples`` how many samples it folds and ``window_s`` its length, ``ts``
    being when it started; ``job_id`` the job running on that entity then (a
    GPU's job, or the node's one job), absent when none or several.
    """

    source: Ident
    entity: Ident = "node"
    metrics: Metrics = {}
    #: Length of the window (0: a single sample).
    window_s: Seconds = 0.0
    samples: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    min: Metrics = {}
    max: Metrics = {}
    job_id: JobId | None = None


#: Marks among a GPU window's ``metrics`` (1 when set; not metrics to summarise): its profiling metrics
#: are dcgm-exporter's, and the exporter gave nothing for the GPU (so it has none). Written by the
#: telemetry plugin, read by ``vetd job report``.
DCGM_MARK, DCGM_FAILED = "profiling_dcgm", "profiling_dcgm_failed"


class Command(Envelope, tag="cmd"):
    """Controller → agent request; ``node`` is the target node."""

    id: Id
    action: Ident
    args: Args = {}
    #: Unix time after which the agent must refuse it (0: no expiry).
    expires: Seconds = 0.0
    #: HMAC-SHA256 over :func:`command_digest_input`, hex; empty: unsigned.
    signature: Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{0,128}\Z")] = ""
    #: A structured request too large or rich for ``args`` (MessagePack; a campaign's pair-round
    #: message, :mod:`vetd.agent.campaign`), covered by the signature. Added after version 1.
    body: Body = b""


class Reply(Envelope, tag="reply"):
    """Agent → controller answer to a :class:`Command`."""

    id: Id
    ok: bool
    message: Text = ""
    data: Annotated[dict[Ident, Text], msgspec.Meta(max_length=32)] = {}
    #: A structured answer (MessagePack; a campaign's pair-round message). Added after version 1.
    body: Body = b""


Message = State | Result | Event | Telemetry | Command | Reply


class AckRange(msgspec.Struct, array_like=True, frozen=True):
    """Sequence numbers ``first..last`` (inclusive) of one agent session."""

    session: Id
    first: Seq
    last: Seq


#: Most ranges one ack carries; the controller splits longer lists over several acks.
MAX_ACK_RANGES: Final = 1024


class Ack(Envelope, tag="ack"):
    """Controller → agent: these results and events are committed to the controller's store.

    Sent after each commit for what that commit stored *and* for duplicates
    (a lost ack must not make the agent resend forever). ``node`` is the
    agent's node; ``session`` is the controller's run, ``seq`` 0. Not a
    member of :data:`Message`: it travels on its own topic (:func:`ack_topic`)
    and is decoded only by :func:`decode_ack`.
    """

    ranges: Annotated[list[AckRange], msgspec.Meta(max_length=MAX_ACK_RANGES)] = []
    #: Send again, now, everything not yet acknowledged. The controller asks this of every node
    #: whose retained birth reaches it as it subscribes: what a node published before that
    #: subscription (a first start, a broker that lost its store) the broker dropped unseen.
    resend: bool = False


#: ``in_service``: the controller lets jobs run here; ``excluded``: vetd took the node out of
#: service and the scheduler has not confirmed a drain (backend ``none``: only vetd's hostlist,
#: or the drain is still being carried out); ``drained``: the scheduler confirmed the drain.
ServiceState = Literal["in_service", "excluded", "drained"]


class ServiceNotice(Envelope, tag="service"):
    """Controller → agent, retained: whether the controller has this node in service.

    ``node`` is the agent's node; ``session`` is the controller's run, ``seq`` 0. Not a member
    of :data:`Message`: it travels on its own topic (:func:`service_topic`) and is decoded only
    by :func:`decode_service`.
    """

    service: ServiceState
    #: The controller's node state: ``healthy``, ``suspect``, ``excluded``, ``healing``,
    #: ``probation`` or ``failed``.
    state: Annotated[str, msgspec.Meta(pattern=r"\A[a-z_]{0,32}\Z")] = ""
    #: Why it is out of service (the drain reason, ``vetd: RULE: …``); empty in service.
    reason: Text = ""
    #: When the node entered ``state``.
    since: Seconds = 0.0
    #: The circuit breaker of the node's partition is open: the controller drains nothing more
    #: there, so a prolog or epilog must not drain for a failed check either.
    breaker_open: bool = False


_CHANNEL_OF: Final[dict[type[Envelope], str]] = {
    State: "state",
    Result: "result",
    Event: "event",
    Telemetry: "telemetry",
    Command: "cmd",
    Reply: "reply",
}

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)
_ack_decoder: Final = msgspec.msgpack.Decoder(Ack)
_service_decoder: Final = msgspec.msgpack.Decoder(ServiceNotice)


#: Longest validity a signed command may claim (a captured command cannot be saved for later).
MAX_COMMAND_VALIDITY_S: Final = 86400.0


def command_digest_input(command: Command) -> bytes:
    """What a command's signature covers: target, identity, action, arguments, expiry, and the
    body when there is one (a command without one is signed as before the body existed)."""
    fields: list[object] = [command.cluster, command.node, command.id, command.action,
                            sorted(command.args.items()), command.expires]
    if command.body:
        fields.append(command.body)
    return _encoder.encode(fields)


def node_key(master: bytes, cluster: str, node: str) -> bytes:
    """The command key of one node, derived from the controller's master key.

    HMAC-SHA256(master, ``b"vetd-node-key\\0" + cluster + b"\\0" + node``), hex
    (as ASCII bytes: what ``vetd keys derive`` writes to the node's key file
    and what the agent reads back). An agent holds only its own key, so a node
    that is taken over can sign commands for nobody else.
    """
    label = b"vetd-node-key\0" + cluster.encode() + b"\0" + node.encode()
    return hmac.new(master, label, hashlib.sha256).hexdigest().encode()


def sign_command(command: Command, key: bytes) -> Command:
    digest = hmac.new(key, command_digest_input(command), hashlib.sha256).hexdigest()
    return msgspec.structs.replace(command, signature=digest)


def verify_command(command: Command, key: bytes, now: float) -> str | None:
    """Why ``command`` must be refused (``unsigned``, ``bad signature``, ``expired``…), or None."""
    if not command.signature:
        return "unsigned"
    expected = hmac.new(key, command_digest_input(command), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, command.signature):
        return "bad signature"
    if not command.expires or command.expires <= now:
        return "expired"
    if command.expires - now > MAX_COMMAND_VALIDITY_S:
        return "valid for too long"
    return None


def encode(message: Message | Ack | ServiceNotice) -> bytes:
    """Encode one message as MessagePack."""
    return _encoder.encode(message)


def decode(payload: bytes | bytearray | memoryview) -> Message:
    """Decode and validate one payload; any defect raises :class:`ProtocolError`."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        message: Message = _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(str(exc)) from exc
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise ProtocolError(f"undecodable payload: {exc.__class__.__name__}") from exc
    return message


def valid_name(name: str) -> bool:
    """Whether ``name`` is usable as a cluster or node name (no trailing newline, no leading ``-``)."""
    return bool(_NAME.search(name))


def valid_id(text: str) -> bool:
    """Whether ``text`` fits a session, command or boot id (letters, digits, ``_.:-``; at most 128)."""
    return bool(_ID.search(text))


def channel_of(message: Message) -> str:
    """The topic channel a message travels on."""
    return _CHANNEL_OF[type(message)]


def topic(cluster: str, node: str, channel: str) -> str:
    """``vetd/v1/<cluster>/node/<node>/<channel>``."""
    return f"{TOPIC_ROOT}/{cluster}/node/{node}/{channel}"


def topic_for(message: Message) -> str:
    """The topic a message is published on."""
    return topic(message.cluster, message.node, channel_of(message))


def ack_topic(cluster: str, node: str) -> str:
    """``vetd/v1/<cluster>/ack/<node>``: where the controller acknowledges a node's messages."""
    return f"{TOPIC_ROOT}/{cluster}/ack/{node}"


def decode_ack(topic_name: str, payload: bytes | bytearray | memoryview) -> Ack:
    """Decode an :class:`Ack` and check it is for the node whose ack topic it came on."""
    ack = _bounded_decode(_ack_decoder, payload)
    if ack_topic(ack.cluster, ack.node) != topic_name:
        raise ProtocolError("ack does not match its topic")
    if any(r.first > r.last for r in ack.ranges):
        raise ProtocolError("ack range with first > last")
    return ack


def service_topic(cluster: str, node: str) -> str:
    """``vetd/v1/<cluster>/service/<node>``: the controller's retained word on whether a node is in service."""
    return f"{TOPIC_ROOT}/{cluster}/service/{node}"


def decode_service(topic_name: str, payload: bytes | bytearray | memoryview) -> ServiceNotice:
    """Decode a :class:`ServiceNotice` and check it is for the node whose service topic it came on."""
    notice = _bounded_decode(_service_decoder, payload)
    if service_topic(notice.cluster, notice.node) != topic_name:
        raise ProtocolError("service notice does not match its topic")
    return notice


_T = TypeVar("_T")


def _bounded_decode(decoder: msgspec.msgpack.Decoder[_T], payload: bytes | bytearray | memoryview) -> _T:
    """``decoder.decode(payload)`` with the size bound; any defect raises :class:`ProtocolError`."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(str(exc)) from exc
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise ProtocolError(f"undecodable payload: {exc.__class__.__name__}") from exc


def subscription(cluster: str | None = None) -> str:
    """Topic filter for every node channel of one cluster, or of all clusters."""
    return f"{TOPIC_ROOT}/{cluster or '+'}/node/+/+"


def parse_topic(name: str) -> tuple[str, str, str]:
    """Split a node topic into ``(cluster, node, channel)``."""
    parts = name.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or parts[3] != "node":
        raise ProtocolError(f"not a vetd node topic: {name[:200]!r}")
    cluster, node, channel = parts[2], parts[4], parts[5]
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel[:50]!r}")
    return cluster, node, channel


def decode_from(topic_name: str, payload: bytes | bytearray | memoryview) -> Message:
    """Decode a payload and check it matches the topic it arrived on.

    A message whose cluster, node or kind disagrees with its topic is rejected:
    with per-node broker ACLs this stops one node speaking for another.
    """
    cluster, node, channel = parse_topic(topic_name)
    message = decode(payload)
    if (message.cluster, message.node, channel_of(message)) != (cluster, node, channel):
        raise ProtocolError("message does not match its topic")
    return message
