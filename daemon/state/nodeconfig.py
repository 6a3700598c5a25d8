"""The node configuration as an operator sees it: show, set, repair (``p2pupd config``).

Theory of operation. ``STATE/config.msgpack`` stays the one source of truth,
written only by a holder of the state lock (a command, or the daemon under its
state mutex), atomically and with a backup copy. Operators read it with
``config show`` (TOML-shaped text, or JSON) and change it with ``config set
KEY VALUE``, where KEY is the dotted path ``config show`` prints. We did not
make a hand-edited TOML file the truth: the daemon holds the node lock for its
whole life and reads the configuration once, so a file edited behind its back
would be a second writer it cannot serialise with, and a typo would only be
found when the node next starts -- or fails to. ``config set`` checks the value
first (a health command must resolve), changes nothing when it is refused, and
with a daemon running goes through it, so the change is live at once.

Every settable key is in ``SETTINGS``: what it parses, how it is checked and
whether a running daemon can take it (``platform`` is read at start).

``salvage`` is the repair: it rebuilds a usable configuration from whatever of
a damaged state directory survives -- the backup copy whole, else the fields of
the damaged document that still decode, else the node id found in its raw bytes
-- and says what it could not keep. The rollback high-water marks live in
``state.msgpack`` and are never touched by it.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pupd.daemon.errors import ConfigError, StorageError
from p2pupd.daemon.state.statedir import (
    ComponentConfig,
    HookLimits,
    NodeConfig,
    StateDir,
    default_platform,
    new_node_id,
)
from p2pupd.protocol import encoding, ids
from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.limits import MiB

NODE_ID_BYTES = 16
# How a canonical document spells the node id: fixstr "node_id", bin8 of 16 bytes.
_NODE_ID_MARK = b"\xa7node_id\xc4\x10"
MAX_RETAIN = 100


# -- values ---------------------------------------------------------------------------


def parse_health_cmd(text: str) -> tuple[str, ...]:
    """Split a health command the way a shell would (``sh -c "exit 0"`` is three words).

    Raises ``ConfigError`` for unbalanced quotes. An empty string means "none".
    """
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"health command {text!r}: {exc} (quote it as for a shell)") from None


def check_health_cmd(argv: tuple[str, ...], targets: list[Path]) -> None:
    """Raise ``ConfigError`` unless ``argv[0]`` can be started.

    A path must name an executable file, a bare name must be on ``PATH``. A
    path under one of the node's ``targets`` is allowed before it exists: a
    self-test shipped inside the release appears with the first apply (and the
    check runs after the swap).
    """
    if not argv:
        return
    prog = argv[0]
    if "/" in prog:
        path = Path(prog)
        if not path.is_absolute():
            raise ConfigError(f"health command {prog!r}: give an absolute path or a name on PATH")
        if any(path == t or t in path.parents for t in targets) and not path.exists():
            return
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"health command {prog!r} is not an executable file")
    elif shutil.which(prog) is None:
        raise ConfigError(f"health command {prog!r} is not found on PATH ({os.environ.get('PATH', '')})")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"want true or false, got {text!r}")


def _int(text: str, lo: int, hi: int | None = None) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"want a whole number, got {text!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"want {lo}..{hi}, got {value}" if hi else f"want at least {lo}, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"want seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise ConfigError(f"want 0 < seconds <= 86400, got {text}")
    return value


# -- the settable keys ------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One settable key: its help line, and how a text value changes a configuration."""

    help: str
    change: Callable[[NodeConfig, str | None, str], NodeConfig]  # (config, component, text)
    live: bool = True  # a running daemon takes it without a restart


def _comp(field: str, parse: Callable[[str], Any]) -> Callable[[NodeConfig, str | None, str], NodeConfig]:
    def change(cfg: NodeConfig, name: str | None, text: str) -> NodeConfig:
        assert name is not None
        c = replace(cfg.component(name), **{field: parse(text)})
        return replace(cfg, components={**cfg.components, name: c})

    return change


def _hooks(field: str, parse: Callable[[str], Any]) -> Callable[[NodeConfig, str | None, str], NodeConfig]:
    def change(cfg: NodeConfig, _name: str | None, text: str) -> NodeConfig:
        return replace(cfg, hooks=replace(cfg.hooks, **{field: parse(text)}))

    return change


def _platform(cfg: NodeConfig, _name: str | None, text: str) -> NodeConfig:
    try:
        return replace(cfg, platform=ids.check_platform(text))
    except CodecError as exc:
        raise ConfigError(str(exc)) from None


NODE_SETTINGS: dict[str, Setting] = {
    "platform": Setting(
        "this node's platform, e.g. linux-aarch64 (which release variants it installs)",
        _platform,
        live=False,
    ),
    "hooks.fuel": Setting("fuel per WebAssembly hook", _hooks("fuel", lambda t: _int(t, 1))),
    "hooks.memory_mib": Setting(
        "hook memory limit in MiB", _hooks("memory_bytes", lambda t: _int(t, 1, 1 << 20) * MiB)
    ),
    "hooks.seconds": Setting("hook wall-clock deadline in seconds", _hooks("seconds", _seconds)),
}
COMPONENT_SETTINGS: dict[str, Setting] = {
    "auto_apply": Setting(
        "apply a release as soon as it is complete here (false: only on `p2pupd apply`)",
        _comp("auto_apply", _bool),
    ),
    "retain": Setting(
        "previous versions kept on disk for rollback", _comp("retain", lambda t: _int(t, 0, MAX_RETAIN))
    ),
    "immutable": Setting(
        "targets are never modified in place: hard-link unchanged files", _comp("immutable", _bool)
    ),
    "health_cmd": Setting(
        "command run after a swap, quoted as for a shell; non-zero exit rolls back "
        '("" for none)',
        _comp("health_cmd", parse_health_cmd),
    ),
    "health_timeout": Setting(
        "seconds the health command may take", _comp("health_seconds", _seconds)
    ),
    "allow_hazardous_modes": Setting(
        "install set-id files others can write and world-writable directories without "
        "the sticky bit (refused when false)",
        _comp("allow_hazardous_modes", _bool),
    ),
}


def lookup(key: str) -> tuple[Setting, str | None]:
    """Return the setting ``key`` names and its component (``None``: node-wide).

    Raises ``ConfigError`` naming the keys there are.
    """
    if key in NODE_SETTINGS:
        return NODE_SETTINGS[key], None
    head, _, rest = key.partition(".")
    name, _, field = rest.rpartition(".")
    if head == "components" and name and field in COMPONENT_SETTINGS:
        return COMPONENT_SETTINGS[field], name
    known = ", ".join([*NODE_SETTINGS, *(f"components.NAME.{f}" for f in COMPONENT_SETTINGS)])
    raise ConfigError(f"unknown or read-only setting {key!r}; settable: {known}")


def set_value(cfg: NodeConfig, key: str, text: str, *, daemon_running: bool = False) -> NodeConfig:
    """Return ``cfg`` with ``key`` set from ``text``; ``ConfigError`` if refused.

    A health command is checked here, so a value that cannot run is refused
    before it could mark a release bad.
    """
    setting, name = lookup(key)
    if name is not None and name not in cfg.components:
        have = ", ".join(sorted(cfg.components)) or "none"
        raise ConfigError(f"{key}: component {name!r} is not configured here (have: {have})")
    if daemon_running and not setting.live:
        raise ConfigError(f"{key} is read when the daemon starts: stop the daemon, set it, start it")
    try:
        new = setting.change(cfg, name, text)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if name is not None:
        check_health_cmd(new.components[name].health_cmd, [c.target for c in new.components.values()])
    return new


# -- show -------------------------------------------------------------------------------


def as_doc(cfg: NodeConfig) -> dict[str, Any]:
    """The configuration as plain data, keyed as ``config set`` takes it."""
    return {
        "node_id": cfg.node_id.hex(),
        "platform": cfg.platform,
        "cluster": cfg.cluster,
        "hooks": {
            "fuel": cfg.hooks.fuel,
            "memory_mib": cfg.hooks.memory_bytes / MiB
            if cfg.hooks.memory_bytes % MiB
            else cfg.hooks.memory_bytes // MiB,
            "seconds": cfg.hooks.seconds,
        },
        "components": {
            n: {
                "target": str(c.target),
                "kind": c.kind,
                "auto_apply": c.auto_apply,
                "retain": c.retain,
                "immutable": c.immutable,
                "health_cmd": list(c.health_cmd),
                "health_timeout": c.health_seconds,
                "allow_hazardous_modes": c.allow_hazardous_modes,
                **({"self_update": True, "platform": c.platform} if c.self_update else {}),
            }
            for n, c in sorted(cfg.components.items())
        },
    }


# -- repair -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Salvage:
    config: NodeConfig
    notes: list[str]
    node_id_kept: bool


def salvage(sd: StateDir, platform: str | None = None) -> Salvage:
    """Rebuild the configuration of ``sd`` from what survives (see the module doc).

    ``platform`` is used when none survives (default: this machine's). Never
    raises for damage; raises ``StorageError`` only if a file cannot be read.
    """
    try:
        backup = NodeConfig.from_value(encoding.decode(_read(sd.config_backup_path) or b""))
        return Salvage(backup, [f"restored the configuration from {sd.config_backup_path.name}"], True)
    except (ConfigError, CodecError):
        pass
    notes: list[str] = []
    raws = [r for r in (_read(sd.config_path), _read(sd.config_backup_path)) if r]
    docs = [d for d in (_decode(r) for r in raws) if isinstance(d, dict)]
    node_id = _first(_node_id(d.get("node_id")) for d in docs) or _first(_scan(r) for r in raws)
    kept = node_id is not None
    if node_id is None:
        node_id = new_node_id()
        notes.append(
            f"the node id could not be recovered: this node is now {node_id.hex()} "
            "(peers and request files see a new node)"
        )
    doc = docs[0] if docs else {}
    plat = _first(_platform_of(d.get("platform")) for d in docs)
    if plat is None:
        plat = platform or default_platform()
        notes.append(f"platform set to {plat} (none survived)")
    try:
        hooks = HookLimits.from_value(doc.get("hooks"))
    except (ConfigError, TypeError, ValueError, AttributeError):
        hooks = HookLimits()
        notes.append("hook limits reset to the defaults")
    comps: dict[str, ComponentConfig] = {}
    raw_comps = doc.get("components")
    for name, value in (raw_comps.items() if isinstance(raw_comps, dict) else []):
        try:
            comps[ids.check_component(name)] = ComponentConfig.from_value(name, value)
        except (ConfigError, CodecError, KeyError, TypeError, ValueError, AttributeError) as exc:
            notes.append(f"component {name!r:.40} could not be kept ({exc})")
    try:
        states = sd.read_states()
    except StorageError:
        states = {}
        notes.append(f"{sd.state_path.name} is damaged too: not repaired by this command")
    for name in sorted(set(states) - set(comps)):
        notes.append(
            f"component {name} has state here (high-water serial {states[name].high_water}) "
            f"but no configuration: add it again with `p2pupd init --component {name}=TARGET`"
        )
    cluster = doc.get("cluster")
    cfg = NodeConfig(
        node_id, plat, comps, cluster if isinstance(cluster, str) and cluster else "default", hooks
    )
    return Salvage(cfg, notes, kept)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None


def _decode(raw: bytes) -> Any:
    try:
        return encoding.decode(raw)
    except CodecError:
        return None


def _node_id(v: Any) -> bytes | None:
    return v if isinstance(v, bytes) and len(v) == NODE_ID_BYTES else None


def _platform_of(v: Any) -> str | None:
    try:
        return ids.check_platform(v)
    except CodecError:
        return None


def _scan(raw: bytes) -> bytes | None:
    """The node id in a document too damaged to decode, if its bytes survive."""
    at = raw.find(_NODE_ID_MARK)
    if at < 0 or len(raw) < at + len(_NODE_ID_MARK) + NODE_ID_BYTES:
        return None
    start = at + len(_NODE_ID_MARK)
    return raw[start : start + NODE_ID_BYTES]


def _first(values: Any) -> Any:
    return next((v for v in values if v is not None), None)
