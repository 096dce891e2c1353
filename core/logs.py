"""Logging, configured once per process: structlog, JSON lines unless on a TTY.

Standard-library loggers (aiomqtt, paho, amqtt) go through the same processors,
so one process writes one format.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import structlog

#: ``scheme://user:password@`` in any text: the password is never written to a log.
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@/]*@")


def redact(text: str) -> str:
    """``mqtt://user:secret@host`` → ``mqtt://user:***@host`` (text without credentials is unchanged)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def redact_credentials(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: passwords in URLs anywhere in a log line (fields, exceptions) become ``***``."""
    for key, value in event.items():
        if isinstance(value, str) and "@" in value:
            event[key] = redact(value)
    return event


def setup(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging (idempotent)."""
    import structlog  # here, not at the top: redact() is imported by commands that never log

    out = stream or sys.stderr
    as_json = not out.isatty() if json is None else json
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_credentials,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho logs every packet at DEBUG; keep it out unless asked for.
    logging.getLogger("mqtt").setLevel(max(root.level, logging.INFO))
    logging.getLogger("amqtt").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("transitions").setLevel(logging.WARNING)
