"""The daemon's options: the configuration file (``/etc/p2pupd/config.toml``) and flags.

Every option has a default; the file may be absent. Command-line flags win
over the file; ``DaemonOptions`` is the merged result as a plain value (no
trio import: the CLI builds it). Unknown keys are an error (a typo should not
silently leave a site on defaults). The annotated file, every option with its
default: tools/systemd/config.toml.

    [node]
    state_dir = "/var/lib/p2pupd"

    [network]
    listen = "0.0.0.0:7707"
    peers = ["10.1.2.3:7707"]       # static peers for routed networks
    mdns = true
    mdns_interfaces = []            # addresses to run mDNS on; empty = all
    bandwidth_limit = ""            # e.g. "5M" (bytes/s); empty = unlimited
    gossip_interval = 30            # seconds
    peer_timeout = 120              # seconds a peer may leave us unanswered
    max_peers = 24                  # connections admitted at most (sockets stay bounded)
    view_target = 12                # peers a node works to keep linked (partial view)
    view_max = 16                   # peers it accepts links from at most
    passive_view = 64               # addresses remembered to replace lost links
    per_host = 8                    # inbound connections from one IP address
    mdns_beacons = 8                # nodes of a site that register in mDNS

    [import]
    watch = ["/media"]              # auto-import bundles appearing below these

    [metrics]
    listen = ""                     # e.g. "127.0.0.1:9477"; empty = off

    [site]
    public = "/etc/p2pupd/site.pub" # the site this node belongs to (like init --site)

    [rollout]
    operators = []                  # node keys (hex) that may resume or skip waves
    report_interval = 600           # seconds between this node's report refreshes
    settle = 60                     # seconds a daemon listens before taking a wave
    live = 0                        # a report is evidence this long; 0 = 3 refreshes
    gone = 21600                    # a silent node leaves the site view after this

    [log]
    level = "info"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pupd.daemon.errors import ConfigError

DEFAULT_PORT = 7707
# Seconds a peer may go without answering any request of ours, while one
# waits, before it is dropped (a peer that keeps answering is waited for:
# daemon/net/transport.py). Raised for links so slow that one answer takes
# longer than this (a 64 KiB chunk at 1 kB/s: a minute).
DEFAULT_PEER_TIMEOUT = 120.0
MAX_PEER_TIMEOUT = 3600
DEFAULT_LISTEN = ("0.0.0.0", DEFAULT_PORT)
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}


@dataclass(frozen=True)
class RolloutConfig:
    """The ``[rollout]`` section (see docs/rollouts.md)."""

    operators: tuple[bytes, ...] = ()  # public node keys that may resume / skip waves
    report_interval: float = 600.0
    settle: float = 60.0
    live: float | None = None  # None: 3 x report_interval
    gone: float = 6 * 3600.0


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
    peer_timeout: float = DEFAULT_PEER_TIMEOUT
    max_peers: int = 24
    view_target: int = 12
    view_max: int = 16
    passive_view: int = 64
    per_host: int = 8
    mdns_beacons: int = 8
    metrics_listen: tuple[str, int] | None = None  # Prometheus endpoint; None = off
    watch: tuple[Path, ...] = ()  # directories watched for bundles to import
    site_file: Path | None = None  # site document to pin at start (if none is pinned)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


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


DEFAULT_CONFIG_PATH = Path("/etc/p2pupd/config.toml")

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "node": {"state_dir": str},
    "network": {
        "listen": str,
        "peers": list,
        "mdns": bool,
        "mdns_interfaces": list,
        "bandwidth_limit": (str, int),
        "gossip_interval": (int, float),
        "peer_timeout": (int, float),
        "max_peers": int,
        "view_target": int,
        "view_max": int,
        "passive_view": int,
        "per_host": int,
        "mdns_beacons": int,
    },
    "import": {"watch": list},
    "metrics": {"listen": str},
    "site": {"public": str},
    "log": {"level": str},
    "rollout": {
        "operators": list,
        "report_interval": (int, float),
        "settle": (int, float),
        "live": (int, float),
        "gone": (int, float),
    },
}
LOG_LEVELS = ("debug", "info", "warning", "error")
# Bounds of the size options: per peer state stays bounded whatever is set.
_SIZES = {
    "max_peers": (4, 256),
    "view_target": (2, 64),
    "view_max": (2, 128),
    "passive_view": (4, 1024),
    "per_host": (1, 256),
    "mdns_beacons": (1, 64),
}


@dataclass(frozen=True)
class FileConfig:
    """Values read from the file; ``None`` means "not set there"."""

    state_dir: Path | None = None
    listen: str | None = None
    peers: tuple[str, ...] | None = None
    mdns: bool | None = None
    mdns_interfaces: tuple[str, ...] | None = None
    bandwidth_limit: str | None = None
    gossip_interval: float | None = None
    peer_timeout: float | None = None
    max_peers: int | None = None
    view_target: int | None = None
    view_max: int | None = None
    passive_view: int | None = None
    per_host: int | None = None
    mdns_beacons: int | None = None
    watch: tuple[Path, ...] | None = None
    metrics_listen: str | None = None
    log_level: str | None = None
    site_file: Path | None = None
    rollout: RolloutConfig | None = None


def load_config(path: Path, required: bool = False) -> FileConfig:
    """Read and check ``path``; an absent file gives all-``None`` unless ``required``.

    Raises ``ConfigError`` (exit code 2) naming the file and the bad key.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return FileConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _check(doc, path)
    get = _getter(doc)
    level = get("log", "level")
    if level is not None and level not in LOG_LEVELS:
        raise ConfigError(f"{path}: [log] level must be one of {', '.join(LOG_LEVELS)}")
    bw = get("network", "bandwidth_limit")
    interval = get("network", "gossip_interval")
    if interval is not None and interval <= 0:
        raise ConfigError(f"{path}: [network] gossip_interval must be positive")
    peer_timeout = get("network", "peer_timeout")
    if peer_timeout is not None and not 1 <= peer_timeout <= MAX_PEER_TIMEOUT:
        raise ConfigError(
            f"{path}: [network] peer_timeout must be between 1 and {MAX_PEER_TIMEOUT} seconds"
        )
    sizes = {k: get("network", k) for k in _SIZES}
    for key, (lo, hi) in _SIZES.items():
        value = sizes[key]
        if value is not None and not lo <= value <= hi:
            raise ConfigError(f"{path}: [network] {key} must be between {lo} and {hi}")
    target, most = sizes["view_target"], sizes["view_max"]
    if target is not None and most is not None and target > most:
        raise ConfigError(f"{path}: [network] view_target must not exceed view_max")
    return FileConfig(
        state_dir=_path(get("node", "state_dir")),
        listen=get("network", "listen"),
        peers=_strs(get("network", "peers"), path, "network.peers"),
        mdns=get("network", "mdns"),
        mdns_interfaces=_strs(get("network", "mdns_interfaces"), path, "network.mdns_interfaces"),
        bandwidth_limit=None if bw in (None, "", 0) else str(bw),
        gossip_interval=None if interval is None else float(interval),
        peer_timeout=None if peer_timeout is None else float(peer_timeout),
        **sizes,
        watch=tuple(Path(p) for p in _strs(get("import", "watch"), path, "import.watch") or ())
        if get("import", "watch") is not None
        else None,
        metrics_listen=get("metrics", "listen") or None,
        log_level=level,
        site_file=_path(get("site", "public") or None),
        rollout=_rollout(doc.get("rollout"), path),
    )


def _rollout(body: dict[str, Any] | None, path: Path) -> RolloutConfig | None:
    if body is None:
        return None
    keys = []
    for text in _strs(body.get("operators"), path, "rollout.operators") or ():
        keys.append(parse_node_key(text, f"{path}: rollout.operators"))
    for name in ("report_interval", "settle", "gone"):
        if name in body and body[name] <= 0:
            raise ConfigError(f"{path}: rollout.{name} must be positive")
    if body.get("live", 0) < 0:
        raise ConfigError(f"{path}: rollout.live must be 0 (automatic) or positive")
    base = RolloutConfig()
    return RolloutConfig(
        operators=tuple(keys),
        report_interval=float(body.get("report_interval", base.report_interval)),
        settle=float(body.get("settle", base.settle)),
        live=float(body["live"]) if body.get("live") else None,
        gone=float(body.get("gone", base.gone)),
    )


def parse_node_key(text: str, what: str = "node key") -> bytes:
    """A public node key as 64 hex characters (``p2pupd status`` shows it); ``ConfigError`` else."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{what}: {text!r:.80} is not a node key (64 hex characters)")
    return raw


def network_sizes(cfg: FileConfig) -> dict[str, int | None]:
    """The view and admission sizes the file sets (``None``: not set), by option name."""
    return {key: getattr(cfg, key) for key in _SIZES}


def _check(doc: dict[str, Any], path: Path) -> None:
    for section, body in doc.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{path}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for key, value in body.items():
            want = _SCHEMA[section].get(key)
            if want is None:
                raise ConfigError(f"{path}: unknown option {section}.{key}")
            if isinstance(value, bool) and want is not bool and bool not in _as_tuple(want):
                raise ConfigError(f"{path}: {section}.{key} has the wrong type")
            if not isinstance(value, want):
                raise ConfigError(f"{path}: {section}.{key} has the wrong type")


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _getter(doc: dict[str, Any]) -> Any:
    def get(section: str, key: str) -> Any:
        return doc.get(section, {}).get(key)

    return get


def _strs(v: Any, path: Path, what: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{path}: {what} must be a list of strings")
    return tuple(v)


def _path(v: str | None) -> Path | None:
    return None if v is None else Path(v)
