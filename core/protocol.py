"""The vetd wire protocol: topics and MessagePack-encoded msgspec Structs.

The agent owns this contract; the controller imports it. Rules that keep old
and new peers talking:

* every message is one member of a tagged union (field ``kind``);
* new fields always get defaults, and no field ever changes its type;
* decoders skip unknown fields, so a newer agent can talk to an older controller.

Topics are ``vetd/v1/<cluster>/node/<node>/<channel>`` with channel one of
``state`` (retained birth / Last Will), ``result``, ``event``, ``telemetry``,
``cmd`` (controller → agent) and ``reply`` (agent → controller).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final, Literal

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

# Cluster and node names end up in topics, Slurm arguments and file names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ProtocolError(ValueError):
    """A payload or topic that is not a valid vetd message."""


class Envelope(msgspec.Struct, kw_only=True, tag_field="kind", omit_defaults=True):
    """Fields every message carries."""

    v: int = SCHEMA_VERSION
    cluster: str
    node: str
    #: Per-boot (per agent start) session id; ``seq`` restarts with it.
    session: str
    #: Per-session sequence number: deduplication and loss detection.
    seq: int
    #: Unix time, seconds, when the message was made.
    ts: float


class State(Envelope, tag="state"):
    """Retained node state: the birth on connect, the Last Will on loss."""

    online: bool
    #: When this session started; a death from an older session never wins.
    started: float = 0.0
    agent_version: str = ""
    reason: str = ""
    labels: dict[str, str] = {}
    checks: list[str] = []
    #: Messages the agent had to drop (spool full), by kind, since its spool was made.
    dropped: dict[str, int] = {}


class Result(Envelope, tag="result"):
    """One check's verdict on one entity (the node, ``gpu0``, a NIC…)."""

    check: str
    status: Status
    entity: str = "node"
    codes: list[str] = []
    #: Named measurements, units in the name (``temp_c``, ``busbw_gbps``).
    metrics: dict[str, float] = {}
    message: str = ""
    duration_s: float = 0.0
    profile: str = ""
    job_id: str | None = None


class Event(Envelope, tag="event"):
    """Something that happened (an XID, a container start), not a polled check."""

    name: str
    severity: Literal["info", "warning", "critical"] = "info"
    entity: str = "node"
    codes: list[str] = []
    metrics: dict[str, float] = {}
    message: str = ""
    job_id: str | None = None


class Telemetry(Envelope, tag="telemetry"):
    """A sample from one telemetry source."""

    source: str
    entity: str = "node"
    metrics: dict[str, float] = {}


class Command(Envelope, tag="cmd"):
    """Controller → agent request; ``node`` is the target node."""

    id: str
    action: str
    args: dict[str, str] = {}
    #: Unix time after which the agent must refuse it (0: no expiry).
    expires: float = 0.0
    #: HMAC-SHA256 over :func:`command_digest_input`, hex; empty: unsigned.
    signature: str = ""


class Reply(Envelope, tag="reply"):
    """Agent → controller answer to a :class:`Command`."""

    id: str
    ok: bool
    message: str = ""
    data: dict[str, str] = {}


Message = State | Result | Event | Telemetry | Command | Reply

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


#: Longest validity a signed command may claim (a captured command cannot be saved for later).
MAX_COMMAND_VALIDITY_S: Final = 86400.0


def command_digest_input(command: Command) -> bytes:
    """What a command's signature covers: target, identity, action, arguments, expiry."""
    return _encoder.encode([command.cluster, command.node, command.id, command.action,
                            sorted(command.args.items()), command.expires])


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


def encode(message: Message) -> bytes:
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
    if not valid_name(message.cluster) or not valid_name(message.node):
        raise ProtocolError("invalid cluster or node name")
    return message


def valid_name(name: str) -> bool:
    """Whether ``name`` is usable as a cluster or node name."""
    return bool(_NAME.match(name))


def channel_of(message: Message) -> str:
    """The topic channel a message travels on."""
    return _CHANNEL_OF[type(message)]


def topic(cluster: str, node: str, channel: str) -> str:
    """``vetd/v1/<cluster>/node/<node>/<channel>``."""
    return f"{TOPIC_ROOT}/{cluster}/node/{node}/{channel}"


def topic_for(message: Message) -> str:
    """The topic a message is published on."""
    return topic(message.cluster, message.node, channel_of(message))


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
