"""JSON logs through structlog, one object per line, for every role.

stdlib ``logging`` (aiohttp's access log, asyncio's warnings) is routed through the same
renderer so a log shipper sees one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog and stdlib logging; safe to call more than once."""
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp logs every request at INFO; /metrics scrapes would drown the useful lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Throttled:
    """At most one log line per kind every ``every`` seconds; the lines held back are
    counted and reported with the next one. For lines anyone who can reach a port can
    cause (rejected requests, malformed HTTP): they must not be able to fill the logs."""

    __slots__ = ("_clock", "_every", "_held", "_last")

    def __init__(self, clock: Callable[[], float], every: float = 10.0) -> None:
        self._clock = clock
        self._every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        """None to hold this line back; else how many lines of its kind were held back."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)
