"""The daemon's command-line options as a plain value (no trio import: the CLI builds it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from p2pupd.daemon.errors import ConfigError

DEFAULT_PORT = 7707
DEFAULT_LISTEN = ("0.0.0.0", DEFAULT_PORT)
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}


@dataclass(frozen=True)
class DaemonOptions:
    state_dir: Path
    listen: tuple[str, int] = DEFAULT_LISTEN
    peers: tuple[tuple[str, int], ...] = ()
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    bandwidth_limit: int | None = None  # bytes per second, each direction
    log_level: str = "info"
    handle_signals: bool = True  # False when embedded (tests)
    gossip_interval: float = 30.0
    metrics_listen: tuple[str, int] | None = None  # Prometheus endpoint; None = off
    watch: tuple[Path, ...] = ()  # directories watched for bundles to import


def parse_endpoint(text: str, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT``; ``HOST`` alone when a default port is given).

    Raises ``ConfigError`` (exit code 2) for anything else.
    """
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address {text!r}: want HOST:PORT or [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ConfigError(f"bad address {text!r}: the port after ':' is missing")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"bad address {text!r}: a port is required (HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise ConfigError(f"bad address {text!r}: want HOST:PORT with a port in 0-65535")
    return host, int(port_text)


def parse_rate(text: str) -> int:
    """Parse a bandwidth like ``1000000``, ``500k``, ``10M`` or ``10MB/s`` into bytes/s."""
    m = _RATE_RE.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"bad bandwidth limit {text!r}: want BYTES/S, e.g. 5000000 or 5M")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
