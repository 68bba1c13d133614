"""JSON logs through structlog, one object per line, for every role.

stdlib ``logging`` (aiohttp's access log, asyncio's warnings) is routed through the same
renderer so a log shipper sees one format. Requests that aiohttp cannot even parse
(anyone who can reach a port can send them) are logged once per kind per minute at warning,
without a traceback, instead of an error with a traceback each.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
LEVELS = tuple(_LEVELS)


def configure(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog and stdlib logging; safe to call more than once."""
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        # Colours only on a terminal: escape codes in a redirected file are noise.
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
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
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(
            allow=["kind", "reason", "held_back"])],
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
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [f for f in server.filters if not isinstance(f, BadRequestFilter)]
    server.addFilter(BadRequestFilter())


class BadRequestFilter(logging.Filter):
    """aiohttp logs "Error handling request" with a traceback at error for every request it
    cannot parse. Those are the client's fault: keep one line per kind (the parser's
    exception) per minute, at warning, with the reason and how many were held back."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self._gate = Throttled(time.monotonic, every)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not type(exc).__module__.startswith("aiohttp.http_exceptions"):
            return True
        if not logging.getLogger().isEnabledFor(logging.WARNING):
            return False
        kind = type(exc).__name__
        held = self._gate.allow(kind)
        if held is None:
            return False
        reason = getattr(exc, "message", None) or str(exc)
        record.msg = "malformed HTTP request refused"
        record.args = ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        record.__dict__.update(kind=kind, reason=str(reason).splitlines()[0][:200],
                               held_back=held)
        return True


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
