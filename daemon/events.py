"""The daemon's log format: one event per line, ``key=value`` fields.

Every line reads ``ts=<UTC time> level=<level> event=<name> key=value ...``.
Values containing blanks, quotes or ``=`` are JSON-quoted, so a line splits
back into fields with ``shlex.split`` and scripts (the namespace tests, the
swarm benchmark) can wait for e.g. ``event=applied component=app``.

Events the daemon emits, with their fields (others are informational):

    listening        addr
    ready            node peers
    peer-connected   peer addr direction
    peer-closed      peer addr reason
    peer-banned      peer addr until reason
    manifest-accepted component version serial from
    manifest-refused component serial from reason
    release-complete component version serial bytes from
    applied          component version serial from
    apply-failed     component serial reason
    service-failed   service error restart_in
    stopping / stopped
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOGGER = logging.getLogger("p2pupd.daemon")

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:_-/+,@[]")


def format_value(value: object) -> str:
    """Return ``value`` as a log field value, JSON-quoted unless it is plain."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        value = round(value, 3)
    text = str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def format_event(event: str, fields: dict[str, object]) -> str:
    """Return ``event=<event> k=v ...`` (``None`` values are left out)."""
    parts = [f"event={event}"]
    # A trailing underscore lets callers use keywords such as ``from_``.
    parts += [f"{k.rstrip('_')}={format_value(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


Observer = Callable[[str, dict[str, object]], None]
_OBSERVERS: list[Observer] = []


def observe(fn: Observer) -> Callable[[], None]:
    """Call ``fn(event, fields)`` for every event, whatever the log level
    (metrics count events); returns a function that removes it again."""
    _OBSERVERS.append(fn)
    return lambda: _OBSERVERS.remove(fn)


def log(event: str, level: int = logging.INFO, **fields: object) -> None:
    """Emit one event line (cheap when the level is disabled)."""
    for fn in _OBSERVERS:
        fn(event, fields)
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, "%s", format_event(event, fields))


def short(node_id: bytes | None) -> str:
    """The short form of a node id used in logs and tables (12 hex digits)."""
    return node_id.hex()[:12] if node_id else "-"


class LineFormatter(logging.Formatter):
    """``ts=... level=... <message>``; exceptions are folded onto the same line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
        line += record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            line += f" error={format_value(repr(record.exc_info[1]))}"
        return line


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send daemon events to ``stream`` (stderr) at ``level`` (debug/info/warning/error)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(getattr(logging, level.upper(), logging.INFO))
    LOGGER.propagate = False
