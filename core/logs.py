"""Logging, configured once per process: structlog, JSON lines unless on a TTY.

Standard-library loggers (aiomqtt, paho, amqtt) go through the same processors,
so one process writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def setup(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging (idempotent)."""
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
