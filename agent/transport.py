"""The agent's side of MQTT (aiomqtt 2.x).

* On connect: a retained birth ``State(online=True)``; the Last Will is a
  retained ``State(online=False)`` of the same session, so the broker marks the
  node offline when the agent vanishes.
* Results and events go at QoS 1; the broker's PUBACK marks them sent, and
  they leave the spool only when the controller's ack says they are in its
  store (``vetd/v1/<cluster>/ack/<node>``, :class:`~vetd.core.protocol.Ack`).
  Telemetry goes at QoS 0, replies leave on PUBACK.
* The controller's retained word on whether the node is in service
  (``vetd/v1/<cluster>/service/<node>``, :class:`~vetd.core.protocol.ServiceNotice`)
  arrives on subscribing and whenever it changes; it goes to ``on_service``
  (a malformed one is counted and dropped; an empty one, a retained notice
  cleared, is ``None``: the controller says nothing).
* What was sent and not acknowledged is sent again, oldest first, on every
  (re)connect (acks published while we were away are gone: our session is
  clean), when the controller asks (an ack with ``resend``: it has just
  subscribed, and what we published before that the broker may have dropped)
  and when the oldest message sent has had no ack for ``ack_timeout`` (then
  with full-jitter back-off; acks of later messages do not put it off: a
  message lost between us and the controller is sent again even while the
  ones after it are acknowledged); the controller drops duplicates and
  acknowledges them again.
  Once a controller has acknowledged anything, each such pass starts with a
  probe: one message, and the rest only once it is acknowledged. Messages a broker dropped (no subscriber yet after losing
  its store) then come round again before any later one is stored, so each
  node's results are stored in order; and a controller that is down gets one
  resent message per node per back-off, not the whole spool.
* Connection lost → reconnect with full-jitter exponential backoff; the spool
  keeps what is waiting (see :mod:`vetd.agent.spool`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from vetd.agent.spool import Pending, Spool
from vetd.core import __version__, protocol
from vetd.core.mqtt import Backoff, BrokerAddress, connect_forever, raise_swallowed_cancel
from vetd.core.protocol import Command, Message, ServiceNotice, State

log = structlog.get_logger("vetd.transport")

PUBLISH_TIMEOUT_S = 10.0
#: No ack for this long while something sent waits for one: send it again.
ACK_TIMEOUT_S = 30.0
#: Longest extra wait (full jitter) between two resends while acks stay away.
ACK_BACKOFF_CAP_S = 600.0


#: Where Linux keeps the id it draws at each boot.
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot's id (``""`` where the kernel has none to give, or it is not a plain id)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return text if protocol.valid_id(text) else ""


@dataclass
class Identity:
    """Who this agent is on the wire, for one run (one session)."""

    cluster: str
    node: str
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started: float = field(default_factory=time.time)
    #: Sent in every birth: the controller tells a reboot (a new one) from an agent restart.
    boot: str = field(default_factory=boot_id)
    _seq: int = 0

    @property
    def last_seq(self) -> int:
        """The last number handed out on the reliable stream."""
        return self._seq

    def next_seq(self) -> int:
        """Next number of the reliable stream (results and events)."""
        self._seq += 1
        return self._seq

    def stamp(self, *, reliable: bool = True, ts: float | None = None) -> dict[str, Any]:
        """The envelope fields of a new message; ``reliable`` ones (results,
        events) take the next sequence number, the rest carry 0."""
        return {
            "cluster": self.cluster,
            "node": self.node,
            "session": self.session,
            "seq": self.next_seq() if reliable else 0,
            "ts": time.time() if ts is None else ts,
        }

    def state(self, online: bool, **fields: object) -> State:
        return State(
            cluster=self.cluster,
            node=self.node,
            session=self.session,
            seq=0,
            ts=time.time(),
            online=online,
            started=self.started,
            agent_version=__version__,
            boot_id=self.boot,
            **fields,  # type: ignore[arg-type]
        )


CommandHandler = Callable[[Command], Awaitable[None]]
ServiceHandler = Callable[[ServiceNotice | None], None]


class Transport:
    """Keeps one MQTT connection up and moves the spool through it."""

    def __init__(
        self,
        broker: BrokerAddress,
        identity: Identity,
        spool: Spool,
        *,
        keepalive: int = 30,
        birth: Callable[[], State] | None = None,
        on_command: CommandHandler | None = None,
        on_service: ServiceHandler | None = None,
        max_rate: float = 0.0,
        client_options: dict[str, Any] | None = None,
        ack_timeout: float = ACK_TIMEOUT_S,
    ) -> None:
        self.ack_timeout = ack_timeout
        #: After a (re)connect or a resend, one message goes first and the rest wait for its ack.
        self._probing = True
        #: Whether a controller has acknowledged anything in this run: only then is there one to
        #: probe (an agent whose controller is not there yet streams to the broker as before).
        self._acked = False
        self._progress = asyncio.Event()
        self.resends = 0
        self.malformed_acks = 0
        self.max_rate = max_rate
        self.client_options = client_options or {}
        self.broker = broker
        self.identity = identity
        self.spool = spool
        self.keepalive = keepalive
        self.birth = birth or (lambda: identity.state(True))
        self.on_command = on_command
        self.on_service = on_service
        self.connected = asyncio.Event()
        self.connects = 0
        self.malformed_commands = 0
        self.malformed_service = 0
        self._client: aiomqtt.Client | None = None

    def send(self, message: Message) -> None:
        """Spool a message; it is published as soon as the broker is reachable."""
        self.spool.put(message)

    async def run(self) -> None:
        """Connect, publish, reconnect; runs until cancelled."""
        state_topic = protocol.topic(self.identity.cluster, self.identity.node, "state")

        def connect() -> aiomqtt.Client:
            will = aiomqtt.Will(state_topic, protocol.encode(self.identity.state(False, reason="connection lost")),
                                qos=1, retain=True)
            return aiomqtt.Client(self.broker.host, self.broker.port,
                                  identifier=f"vetd-agent-{self.identity.cluster}-{self.identity.node}",
                                  will=will, keepalive=self.keepalive, timeout=PUBLISH_TIMEOUT_S,
                                  **self.client_options)

        async def session(client: aiomqtt.Client, ready: Callable[[], None]) -> None:
            await client.publish(state_topic, protocol.encode(self.birth()), qos=1, retain=True)
            await client.subscribe(protocol.topic(self.identity.cluster, self.identity.node, "cmd"), qos=1)
            await client.subscribe(self._ack_topic, qos=1)
            await client.subscribe(self._service_topic, qos=1)
            self.spool.rewind()  # acks sent while we were away never reach a clean session: resend
            self._probing = True
            self._client = client
            self.connects += 1
            self.connected.set()
            ready()
            log.info("broker_connected", host=self.broker.host, port=self.broker.port, waiting=len(self.spool))
            async with asyncio.TaskGroup() as group:
                group.create_task(self._publish_loop(client), name="vetd.transport.publish")
                group.create_task(self._command_loop(client), name="vetd.transport.commands")
                group.create_task(self._resend_loop(), name="vetd.transport.resend")

        def lost() -> None:
            self._client = None
            self.connected.clear()

        await connect_forever(connect, session, lost=lost, describe=lambda: {
            "host": self.broker.host, "port": self.broker.port, "waiting": len(self.spool)})

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        interval = 1.0 / self.max_rate if self.max_rate > 0 else 0.0
        next_at = time.monotonic()
        while True:
            # Probe: until the controller acknowledges the first message of this pass, send no
            # second. A broker that lost its store (or crashed before saving the controller's
            # subscription) drops what arrives before the controller subscribes again; streaming
            # on, later messages would be stored before the lost ones come round: out of order.
            pending = await self._next()
            if pending is None:
                continue
            now = time.monotonic()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at = max(next_at, now - 1.0) + interval  # up to 1 s of credit, then the pace
            # QoS 1 returns once the broker's PUBACK is in: only then does it leave the spool.
            await client.publish(pending.topic, pending.payload, qos=pending.qos, timeout=PUBLISH_TIMEOUT_S)
            self.spool.done(pending)
            raise_swallowed_cancel()  # stopping: the broker has it, and the loop must not wait for the next

    @property
    def _ack_topic(self) -> str:
        return protocol.ack_topic(self.identity.cluster, self.identity.node)

    @property
    def _service_topic(self) -> str:
        return protocol.service_topic(self.identity.cluster, self.identity.node)

    def _on_service_notice(self, payload: bytes) -> None:
        if not payload:  # the retained notice was cleared
            notice = None
        else:
            try:
                notice = protocol.decode_service(self._service_topic, payload)
            except protocol.ProtocolError as exc:
                self.malformed_service += 1
                log.warning("service_notice_malformed", error=str(exc)[:200], count=self.malformed_service)
                return
        if self.on_service is not None:
            self.on_service(notice)

    async def _resend_loop(self) -> None:
        """Send again what the controller has not acknowledged for ``ack_timeout`` (plus back-off)."""
        backoff = Backoff(base=max(1.0, self.ack_timeout / 4), cap=ACK_BACKOFF_CAP_S)
        wait = self.ack_timeout
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout / 4))
            if not self.spool.awaiting_ack():
                backoff.reset()
                wait = self.ack_timeout
                continue
            idle = time.monotonic() - self.spool.progress_at
            if idle >= wait:
                self.resends += 1
                log.warning("unacknowledged_resent", waited_s=round(idle, 1), waiting=len(self.spool),
                            resends=self.resends)
                self.spool.rewind()
                self._probing = True
                self._progress.set()
                wait = self.ack_timeout + backoff.next()

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = protocol.decode_ack(self._ack_topic, payload)
        except protocol.ProtocolError as exc:
            self.malformed_acks += 1
            log.warning("ack_malformed", error=str(exc)[:200], count=self.malformed_acks)
            return
        self._acked = True
        removed = 0
        for ack_range in ack.ranges:
            removed += self.spool.acknowledge(ack_range.session, ack_range.first, ack_range.last)
        if ack.resend:
            log.info("resend_requested", waiting=len(self.spool))
            self.spool.rewind()
            self._probing = True
            self._progress.set()
        elif removed:
            self._probing = False
            self._progress.set()

    async def _next(self) -> Pending | None:
        """The next message to publish; while a probe waits for its ack, only replies and
        telemetry (None when the ack came: look again)."""
        if not (self._probing and self._acked and self.spool.awaiting_ack()):
            return await self.spool.first()
        self._progress.clear()
        getter = asyncio.ensure_future(self.spool.first(reliable=False))
        progress = asyncio.ensure_future(self._progress.wait())
        try:
            await asyncio.wait({getter, progress}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            progress.cancel()
            if not getter.done():
                getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        async for raw in client.messages:
            try:
                payload = raw.payload if isinstance(raw.payload, bytes | bytearray) else b""
                if raw.topic.value == self._ack_topic:
                    self._on_ack(bytes(payload))
                    continue
                if raw.topic.value == self._service_topic:
                    self._on_service_notice(bytes(payload))
                    continue
                message = protocol.decode_from(raw.topic.value, payload)
            except protocol.ProtocolError as exc:
                self.malformed_commands += 1
                log.warning("command_malformed", error=str(exc)[:200], count=self.malformed_commands)
                continue
            if not isinstance(message, Command):
                continue
            if self.on_command is not None:
                await self.on_command(message)

    async def publish_offline(self, reason: str, timeout: float = 2.0) -> bool:
        """Publish the retained offline state now, if connected."""
        client = self._client
        if client is None:
            return False
        state = self.identity.state(False, reason=reason)
        topic_name = protocol.topic(self.identity.cluster, self.identity.node, "state")
        try:
            await asyncio.wait_for(
                client.publish(topic_name, protocol.encode(state), qos=1, retain=True), timeout
            )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("offline_publish_failed", error=str(exc))
            return False
        return True
