"""Ingest: the controller's MQTT link, per-node admission and decoding.

The one module on this side that speaks MQTT (aiomqtt, persistent session,
reconnect with backoff). Messages arrive in batches (whatever is queued, up
to :data:`BATCH_MAX`); a node flooding beyond ``[limits] per_node_rate`` is
dropped on its topic alone, unread; malformed messages are counted and
logged, never fatal. Commands to agents go out through the same link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator

import aiomqtt
import structlog

from vetd.controller.config import ControllerConfig, LimitsSection
from vetd.controller.counters import Counters
from vetd.core import protocol
from vetd.core.mqtt import client_options, connect_forever, parse_broker
from vetd.core.protocol import Command, ProtocolError

log = structlog.get_logger("vetd.controller")

BATCH_MAX = 1000
#: Log the first N malformed messages, then every Nth.
MALFORMED_LOG_EVERY = 100

Batch = list[tuple[str, bytes]]


class Admission:
    """Per-node token buckets, on the topic alone (no decoding for a flood)."""

    def __init__(self, limits: LimitsSection, counters: Counters) -> None:
        self.limits, self.counters = limits, counters
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, topic_name: str, now: float) -> bool:
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


def decode(batch: Iterable[tuple[str, bytes]], counters: Counters) -> Iterator[protocol.Message]:
    """The valid messages of a batch; the others are counted as ``malformed`` and logged."""
    for topic_name, payload in batch:
        counters.count("received")
        try:
            yield protocol.decode_from(topic_name, payload)
        except ProtocolError as exc:
            counters.count("malformed")
            count = counters["malformed"]
            if count <= 10 or count % MALFORMED_LOG_EVERY == 0:
                log.warning("message_malformed", topic=topic_name[:200], error=str(exc)[:300], count=count)


class BrokerLink:
    """Subscribes to the agents' topics and publishes commands to them."""

    def __init__(self, config: ControllerConfig, counters: Counters) -> None:
        self.config = config
        self.admission = Admission(config.limits, counters)
        self._options = client_options(parse_broker(config.broker), config.auth, f"{config.source}: auth")
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    async def receive(self, on_batch: Callable[[Batch], None]) -> None:
        """Hand every batch of admitted messages to ``on_batch``; reconnect until cancelled."""
        broker = parse_broker(self.config.broker)

        def connect() -> aiomqtt.Client:
            client = aiomqtt.Client(broker.host, broker.port, identifier=self.config.client_id, clean_session=False,
                                    keepalive=30, max_queued_incoming_messages=100_000, **self._options)
            _manual_ack(client)
            return client

        async def session(client: aiomqtt.Client, ready: Callable[[], None]) -> None:
            await client.subscribe(protocol.subscription(self.config.cluster or None), qos=1)
            self._client = client
            self.connected.set()
            ready()
            log.info("broker_connected", broker=self.config.broker, cluster=self.config.cluster or "*")
            batch: Batch = []
            unacked: list[tuple[int, int]] = []  # (mid, qos): PUBACKed once their batch has committed
            async for raw in client.messages:
                unacked.append((raw.mid, raw.qos))
                if self.admission.admit(raw.topic.value, time.monotonic()):
                    payload = raw.payload if isinstance(raw.payload, bytes | bytearray) else b""
                    batch.append((raw.topic.value, bytes(payload)))
                if len(client.messages) == 0 or len(batch) >= BATCH_MAX:
                    if batch:
                        on_batch(batch)
                    batch = []
                    _ack(client, unacked)
                    unacked = []

        def lost() -> None:
            self.connected.clear()
            self._client = None

        await connect_forever(connect, session, lost=lost, describe=lambda: {"broker": self.config.broker})

    async def send(self, topic_name: str, payload: bytes) -> bool:
        """Publish at QoS 1 (the controller's acks to agents); False if the broker did not take it."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic_name, payload, qos=1, timeout=10)
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
        log.info("command_sent", node=command.node, action=command.action, id=command.id)


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


def _ack(client: aiomqtt.Client, messages: list[tuple[int, int]]) -> None:
    for mid, qos in messages:
        if qos:
            client._client.ack(mid, qos)
