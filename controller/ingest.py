"""Ingest: the controller's MQTT link, per-node admission and decoding.

The one module on this side that speaks MQTT (aiomqtt, persistent session,
reconnect with backoff). Messages arrive in batches (whatever is queued, up
to :data:`BATCH_MAX`); a message for a cluster this controller does not own
is dropped on its topic alone (``foreign_cluster``), before any state is made;
a node flooding beyond ``[limits] per_node_rate`` is dropped on its topic
alone, unread; malformed messages are counted and logged, never fatal; names
a node chooses are bounded (:class:`NameBounds`). Commands to agents go out
through the same link, and so do the acks (:mod:`~vetd.controller.acks`).
When the broker held no session for the controller (a first start, a broker
that lost its store), what nodes published before it subscribed was dropped
unseen: the retained births that arrive as it subscribes name the nodes that
were online before it (``on_retained_birth``), and they are asked to send
again what it has not acknowledged. With its session kept, the broker queued
all of it, and nobody is asked (they would resend what waits in the queue).

A batch the store cannot take (``on_batch`` returns False: a full disk) is
given again, with back-off, until it can; meanwhile nothing more is read
and nothing PUBACKed, so the broker keeps the rest (at most
``max_inflight_messages`` are ever delivered and not acknowledged).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import aiomqtt
import msgspec
import structlog

from vetd.controller.acks import CONCURRENCY as ACK_CONCURRENCY
from vetd.controller.config import ControllerConfig, LimitsSection
from vetd.controller.counters import Counters
from vetd.core import protocol
from vetd.core.mqtt import Backoff, client_options, connect_forever, parse_broker
from vetd.core.protocol import Command, ProtocolError, State

log = structlog.get_logger("vetd.controller")

BATCH_MAX = 1000
#: Longest wait between two tries of a batch the store would not take.
STORE_RETRY_CAP_S = 10.0
#: Log the first N malformed messages, then every Nth.
MALFORMED_LOG_EVERY = 100
#: How often rate-limit buckets that have filled up again are forgotten (a full bucket is no bucket).
BUCKET_PRUNE_S = 10.0
#: The entity results and events about entities beyond ``[limits] entities_per_node`` are kept under.
OVERFLOW_ENTITY = "overflow"

Batch = list[tuple[str, bytes]]


def foreign(topic_name: str, cluster: str, counters: Counters) -> bool:
    """Whether ``topic_name`` is not one of ``cluster``'s node topics (counted ``foreign_cluster``)."""
    if topic_name.startswith(f"{protocol.TOPIC_ROOT}/{cluster}/"):
        return False
    counters.count("foreign_cluster")
    dropped = counters["foreign_cluster"]
    if dropped in (1, 10, 100) or dropped % 10_000 == 0:
        log.warning("foreign_cluster_dropped", topic=topic_name[:200], cluster=cluster, dropped=dropped)
    return True


class Admission:
    """Per-node token buckets, on the topic alone (no decoding for a flood).

    Only the controller's own cluster gets a bucket, and buckets that have filled up again are
    forgotten every :data:`BUCKET_PRUNE_S`: there are at most as many as nodes that sent in the
    last ``per_node_burst / per_node_rate`` seconds (10 s at the defaults).
    """

    def __init__(self, limits: LimitsSection, counters: Counters, cluster: str) -> None:
        self.limits, self.counters, self.cluster = limits, counters, cluster
        self._buckets: dict[str, tuple[float, float]] = {}
        self._pruned = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, topic_name: str, now: float) -> bool:
        if foreign(topic_name, self.cluster, self.counters):
            return False
        if now - self._pruned >= BUCKET_PRUNE_S:
            self._prune(now)
        parts = topic_name.split("/", 6)
        key = "/".join(parts[2:5]) if len(parts) >= 5 else topic_name[:100]
        limits = self.limits
        tokens, last = self._buckets.get(key, (limits.per_node_burst, now))
        tokens = min(limits.per_node_burst, tokens + (now - last) * limits.per_node_rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self.counters.count("rate_limited")
            dropped = self.counters["rate_limited"]
            if dropped in (1, 10, 100) or dropped % 10_000 == 0:
                log.warning("node_rate_limited", source=key, dropped=dropped, rate=limits.per_node_rate)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        limits, self._pruned = self.limits, now
        self._buckets = {key: (tokens, last) for key, (tokens, last) in self._buckets.items()
                         if tokens + (now - last) * limits.per_node_rate < limits.per_node_burst}


def malformed(counters: Counters, reason: str, **fields: object) -> None:
    """Count a message dropped as malformed and log why (the first ten, then every hundredth)."""
    counters.count("malformed")
    count = counters["malformed"]
    if count <= 10 or count % MALFORMED_LOG_EVERY == 0:
        log.warning("message_malformed", reason=reason[:300], count=count, **fields)


def decode(batch: Iterable[tuple[str, bytes]], counters: Counters, cluster: str) -> Iterator[protocol.Message]:
    """The valid messages of ``cluster`` in a batch; the others are counted (``foreign_cluster``,
    ``malformed``) and logged."""
    for topic_name, payload in batch:
        counters.count("received")
        if foreign(topic_name, cluster, counters):
            continue
        try:
            yield protocol.decode_from(topic_name, payload)
        except ProtocolError as exc:
            malformed(counters, str(exc), topic=topic_name[:200])


class NameBounds:
    """Per node, the check/event names and entities the controller keeps state for, bounded
    (``[limits] checks_per_node``, ``entities_per_node``): a node cannot grow the rule states,
    firing alerts and latest results by naming new things.

    Counts on from what the store holds at start (:meth:`Store.known_names`).
    """

    def __init__(self, limits: LimitsSection, counters: Counters,
                 known: Mapping[tuple[str, str], tuple[set[str], set[str]]]) -> None:
        self.limits, self.counters = limits, counters
        self._known = dict(known)

    def admit(self, messages: Iterable[protocol.Message]) -> list[protocol.Message]:
        """``messages`` with those naming a check beyond the bound left out, and entities beyond it folded."""
        kept: list[protocol.Message] = []
        for message in messages:
            bounded = self._bounded(message) if isinstance(message, protocol.Result | protocol.Event) else message
            if bounded is not None:
                kept.append(bounded)
        return kept

    def _bounded(self, message: protocol.Result | protocol.Event) -> protocol.Result | protocol.Event | None:
        names, entities = self._known.setdefault((message.cluster, message.node), (set(), set()))
        name = message.check if isinstance(message, protocol.Result) else message.name
        if name not in names:
            if len(names) >= self.limits.checks_per_node:
                self.counters.count("check_limit")
                if self.counters["check_limit"] in (1, 10, 100) or self.counters["check_limit"] % 10_000 == 0:
                    log.warning("check_limit_reached", node=message.node, check=name[:128],
                                limit=self.limits.checks_per_node, dropped=self.counters["check_limit"])
                return None
            names.add(name)
        if message.entity not in entities:
            if len(entities) >= self.limits.entities_per_node:
                self.counters.count("entity_limit")
                if self.counters["entity_limit"] in (1, 10, 100) or self.counters["entity_limit"] % 10_000 == 0:
                    log.warning("entity_limit_reached", node=message.node, entity=message.entity[:128],
                                limit=self.limits.entities_per_node, folded=self.counters["entity_limit"])
                return msgspec.structs.replace(message, entity=OVERFLOW_ENTITY)
            entities.add(message.entity)
        return message


class BrokerLink:
    """Subscribes to the agents' topics and publishes commands to them."""

    def __init__(self, config: ControllerConfig, counters: Counters) -> None:
        self.config = config
        self.admission = Admission(config.limits, counters, config.cluster)
        self._options = client_options(parse_broker(config.broker), config.auth, f"{config.source}: auth")
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        #: Connections made so far: retained service notices are published again after each.
        self.connects = 0

    async def receive(self, on_batch: Callable[[Batch], bool],
                      on_retained_birth: Callable[[State], None] = lambda _: None) -> None:
        """Hand every batch of admitted messages to ``on_batch`` (again, with back-off, while it
        returns False: not stored), and each retained online ``State`` (a node online before this
        subscription) to ``on_retained_birth`` as it comes; reconnect until cancelled."""
        broker = parse_broker(self.config.broker)

        def connect() -> aiomqtt.Client:
            client = aiomqtt.Client(broker.host, broker.port, identifier=self.config.client_id, clean_session=False,
                                    keepalive=30, max_queued_incoming_messages=100_000, **self._options)
            _manual_ack(client)
            _note_session_present(client)
            # aiomqtt warns once per publish beyond 10 waiting for their PUBACK; the acks to agents
            # go up to acks.CONCURRENCY at a time by design (a line per ack under a backlog, before)
            client.pending_calls_threshold = ACK_CONCURRENCY + 100
            return client

        async def session(client: aiomqtt.Client, ready: Callable[[], None]) -> None:
            await client.subscribe(protocol.subscription(self.config.cluster), qos=1)
            self._client = client
            self.connects += 1
            self.connected.set()
            ready()
            log.info("broker_connected", broker=self.config.broker, cluster=self.config.cluster)
            batch: Batch = []
            unacked: list[tuple[int, int]] = []  # (mid, qos): PUBACKed once their batch has committed
            async for raw in client.messages:
                unacked.append((raw.mid, raw.qos))
                if self.admission.admit(raw.topic.value, time.monotonic()):
                    payload = raw.payload if isinstance(raw.payload, bytes | bytearray) else b""
                    batch.append((raw.topic.value, bytes(payload)))
                    if (raw.retain and not getattr(client, SESSION_PRESENT, True)
                            and (birth := _online_state(raw.topic.value, payload)) is not None):
                        on_retained_birth(birth)
                if len(client.messages) == 0 or len(batch) >= BATCH_MAX:
                    if batch:
                        await _handed_over(on_batch, batch)
                    batch = []
                    _ack(client, unacked)
                    unacked = []

        def lost() -> None:
            self.connected.clear()
            self._client = None

        await connect_forever(connect, session, lost=lost, describe=lambda: {"broker": self.config.broker})

    async def send(self, topic_name: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish at QoS 1 (acks and service notices to agents); False if the broker did not take it."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic_name, payload, qos=1, retain=retain, timeout=10)
        except aiomqtt.MqttError:
            return False
        return True

    async def publish(self, command: Command) -> None:
        """Publish a command; one the broker does not take fails its step at the deadline."""
        client = self._client
        if client is None:
            log.warning("command_not_sent", node=command.node, action=command.action, reason="broker away")
            return
        try:
            await client.publish(protocol.topic_for(command), protocol.encode(command), qos=1, timeout=10)
        except aiomqtt.MqttError as exc:
            log.warning("command_not_sent", node=command.node, action=command.action, reason=str(exc))
            return
        # a campaign sends each node a command per step: those only at debug
        (log.debug if command.action == "vet" else log.info)("command_sent", node=command.node,
                                                             action=command.action, id=command.id)


async def _handed_over(on_batch: Callable[[Batch], bool], batch: Batch) -> None:
    """Give ``batch`` to ``on_batch`` until it takes it (PUBACK only after: the broker keeps it)."""
    backoff = Backoff(base=0.5, cap=STORE_RETRY_CAP_S)
    while not on_batch(batch):
        await asyncio.sleep(backoff.next())


def _online_state(topic_name: str, payload: bytes | bytearray) -> State | None:
    """The online ``State`` a (retained) message is, if it is one; anything else is left to the
    batch path, which counts what is malformed."""
    if not topic_name.endswith("/state"):
        return None
    try:
        message = protocol.decode_from(topic_name, payload)
    except ProtocolError:
        return None
    return message if isinstance(message, State) and message.online else None


# -- PUBACK after commit (issue 13) -------------------------------------------
# aiomqtt acknowledges a message as it arrives; a controller killed with a
# backlog in memory would lose it at the broker, and the agents' resends
# would come after later messages the broker still held: out of order. paho
# (under aiomqtt) can leave the PUBACK to us: it goes once the batch is
# committed, so the broker redelivers, in order, what a killed controller had
# not stored. The broker's ``max_inflight_messages`` bounds how many are
# unacknowledged at once (the shipped config: 1000, a full batch).


def _manual_ack(client: aiomqtt.Client) -> None:
    client._client.manual_ack_set(True)  # aiomqtt 2.x has no option for it


#: Set on the client from its CONNACK: whether the broker still held our session (aiomqtt drops the flag).
SESSION_PRESENT = "vetd_session_present"


def _note_session_present(client: aiomqtt.Client) -> None:
    """Keep CONNACK's session-present flag on the client as ``SESSION_PRESENT``."""
    paho = client._client
    on_connect = paho.on_connect
    assert on_connect is not None  # aiomqtt's own: it completes the connect

    def noted(*args: Any) -> None:  # (client, userdata, flags, reason_code, properties)
        setattr(client, SESSION_PRESENT, bool(getattr(args[2], "session_present", False)))
        on_connect(*args)

    paho.on_connect = noted


def _ack(client: aiomqtt.Client, messages: list[tuple[int, int]]) -> None:
    for mid, qos in messages:
        if qos:
            client._client.ack(mid, qos)
