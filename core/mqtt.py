"""MQTT for both sides: broker addresses and credentials, full-jitter back-off, the connect-forever loop.

Each side keeps one MQTT module of its own (the agent's ``transport``, the
controller's ``ingest``); what they share lives here.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import msgspec

from vetd.core.configfile import ConfigError
from vetd.core.files import check_private
from vetd.core.logs import redact

# asyncio and structlog are imported by connect_forever, not here: the agent's config (and with it
# `vetd slurm prolog`, before every job) needs this module's broker types only.


class BrokerAddress(msgspec.Struct, frozen=True):
    host: str
    port: int
    tls: bool = False
    #: Credentials given in the URL (``mqtts://user:password@host``); prefer ``[auth] password_file``.
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:  # never the password, wherever an address is printed
        return f"BrokerAddress(host={self.host!r}, port={self.port}, tls={self.tls}, username={self.username!r})"


def parse_broker(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://…`` (TLS, 8883).

    Credentials in the URL are used as the MQTT username and password; the URL
    is only ever logged through :func:`vetd.core.logs.redact`.
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"unsupported broker scheme {parts.scheme!r} (use mqtt://host:port or mqtts://host:port)")
    if not parts.hostname:
        raise ValueError(f"broker URL {redact(url)!r} has no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {redact(url)!r}: {exc}") from exc
    return BrokerAddress(parts.hostname, port, tls, unquote(parts.username or ""), unquote(parts.password or ""))


class BrokerAuth(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How to prove who we are to the broker, and check who it is.

    With the ACL template in ``packaging/mosquitto/`` an agent's username (or
    its certificate's CN) must be its node name: that is what confines it to
    its own topics.
    """

    #: Empty, for an agent with a password_file: its node name (what the shipped ACL expects).
    username: str = ""
    #: A file holding the password (not the password itself: configs get shared).
    password_file: str = ""
    #: TLS (``mqtts://``): the CA that signed the broker's certificate; empty: system CAs.
    ca_file: str = ""
    #: Client certificate and key, for brokers that want them (optional).
    cert_file: str = ""
    key_file: str = ""


def client_options(address: BrokerAddress, auth: BrokerAuth, where_: str) -> dict[str, Any]:
    """aiomqtt.Client keyword arguments for ``auth`` (reads the password file)."""
    import aiomqtt

    options: dict[str, Any] = {}
    if address.username:
        if auth.username:
            raise ConfigError(f"{where_}: the broker URL and [auth] both give a username; give it in one place")
        options["username"], options["password"] = address.username, address.password or None
    if auth.username:
        options["username"] = auth.username
        if auth.password_file:
            check_private(auth.password_file, f"{where_}.password_file")
            try:
                options["password"] = Path(auth.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{where_}.password_file: cannot read {auth.password_file}: "
                                  f"{exc.strerror or exc}") from exc
    if address.tls or auth.ca_file or auth.cert_file:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(auth, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{where_}.{name}: no such file {value}")
        options["tls_params"] = aiomqtt.TLSParameters(
            ca_certs=auth.ca_file or None, certfile=auth.cert_file or None, keyfile=auth.key_file or None)
    return options


class Backoff:
    """Full-jitter exponential backoff (AWS architecture blog's "Full Jitter")."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def raise_swallowed_cancel() -> None:
    """Raise again a cancellation of the current task that an ``await`` lost.

    aiomqtt waits for a PUBACK with ``asyncio.wait_for``, which on Python 3.11 returns normally when
    the cancellation arrives as the PUBACK does (CPython gh-86296, fixed in 3.12): a loop that
    publishes, then waits for the next message, would wait for ever with its cancel pending, and
    hold up its task group's shutdown. Call it after such an await, in a loop that cleans up nothing.
    """
    import asyncio

    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def connect_forever(
    connect: Callable[[], AbstractAsyncContextManager[Any]],
    session: Callable[[Any, Callable[[], None]], Awaitable[None]],
    *,
    describe: Callable[[], dict[str, Any]],
    lost: Callable[[], None] = lambda: None,
) -> NoReturn:
    """Connect, run ``session(client, ready)``, and reconnect with full-jitter back-off, until cancelled.

    ``connect()`` makes the client (an ``aiomqtt.Client``); ``session`` calls
    ``ready()`` once it has subscribed (the back-off starts again from its
    base) and returns or raises when the connection is gone. ``describe()``
    gives the fields of the ``broker_unavailable`` log line; ``lost()`` runs
    each time a connection ends.
    """
    import asyncio

    import aiomqtt
    import structlog

    log = structlog.get_logger("vetd.mqtt")
    backoff = Backoff()
    while True:
        failed: BaseException | None = None
        cancelled = False
        try:
            async with connect() as client:
                try:
                    await session(client, backoff.reset)
                except asyncio.CancelledError:
                    cancelled = True
                    raise
        except* (aiomqtt.MqttError, OSError) as errors:
            failed = errors.exceptions[0]
        finally:
            lost()
        if cancelled:
            # Cancelled, and the client's disconnect failed on the way out (the broker went away
            # at the same moment): its MqttError replaced our CancelledError. We were told to stop.
            raise asyncio.CancelledError
        delay = backoff.next()
        if failed is not None:
            log.warning("broker_unavailable", error=str(failed), retry_in_s=round(delay, 2), **describe())
        await asyncio.sleep(delay)
