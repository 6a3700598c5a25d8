"""The node's state directory: configuration and per-component state.

Layout (all under STATE, one filesystem):

    config.msgpack            node id, platform, components and their targets
    config.backup.msgpack     a second copy of it, for ``p2pupd config repair``
    state.msgpack             per component: installed serial, kept versions,
                              rollback high-water mark, bad releases, history
    trust/root.msgpack        the pinned root envelope (latest accepted)
    trust/root.<N>.msgpack    every root accepted, for export and audit
    releases/<c>/<serial>.msgpack   verified release envelopes
    releases/<c>/<serial>.<platform>.msgpack   variants carried for other
                              platforms (state/carried.py), never installed
    format                    the state format (state/stateformat.py); absent: 1
    blobs/packs/<t>.pack|.idx small blobs in packs (store/packstore.py)
    blobs/sha256/<hex>        large blobs, and those stored before packs
    journal/<c>.log           the apply journal (see apply/transaction.py)
    lock                      flock held by whoever mutates the state
    tmp/ spool/               blobs on their way into the store (store/spool.py)
    cache/                    derived data (manifests, hook modules, stat caches)

Format 1 had no packs and spooled blobs in ``fetching/`` and ``incoming/``;
its state directories are read as they are (loose blobs stay readable, the
two old spool directories are removed by ``gc``), and marked 2 by the first
command that holds the state lock (the format's rules: state/stateformat.py).

Every member must be what p2pupd made it: ``check_layout`` (run whenever the
node is opened) refuses a state directory in which one is a symlink or of the
wrong kind, with one line, before anything is read, written or cleaned
through it (``store.members``).

Both documents are canonical msgpack written with temp + fsync + rename, so a
crash leaves either the old or the new document, never a torn one.
"""

from __future__ import annotations

import os
import platform
import secrets
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from p2pupd.daemon.errors import ConfigError, NotFoundError, StorageError
from p2pupd.daemon.fsutil import atomic_write, storage_error
from p2pupd.daemon.state import stateformat
from p2pupd.daemon.store import members
from p2pupd.protocol import encoding, ids
from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.limits import (
    HOOK_DEFAULT_FUEL,
    HOOK_DEFAULT_MEMORY_BYTES,
    HOOK_DEFAULT_SECONDS,
)

TARGET_KINDS = ("dir", "symlink", "file")

# What each member of STATE is when present (any may be absent). Parents come
# before their children. Names not listed are left alone.
STATE_LAYOUT: tuple[tuple[str, int], ...] = (
    ("config.msgpack", members.FILE),
    ("state.msgpack", members.FILE),
    ("lock", members.FILE),
    ("node.key", members.FILE),
    ("node.box", members.FILE),
    ("site", members.DIR),
    ("control.sock", members.SOCKET),
    ("trust", members.DIR),
    ("releases", members.DIR),
    ("journal", members.DIR),
    ("cache", members.DIR),
    ("cache/manifests", members.DIR),
    ("cache/hooks", members.DIR),
    ("format", members.FILE),
    ("blobs", members.DIR),
    ("blobs/sha256", members.DIR),
    ("blobs/packs", members.DIR),
    ("tmp", members.DIR),
    ("spool", members.DIR),
    ("fetching", members.DIR),  # format 1
    ("incoming", members.DIR),  # format 1
)
"""Version of the state directory's layout: 2 added packs and the spool."""
LEGACY_DIRS = ("fetching", "incoming")
DEFAULT_RETAIN = 2
HISTORY_LIMIT = 200


def default_platform() -> str:
    """Return this machine's platform name, e.g. ``linux-x86_64``."""
    machine = platform.machine().lower() or "unknown"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{platform.system().lower()}-{machine}"


@dataclass(frozen=True)
class ComponentConfig:
    name: str
    target: Path
    kind: str = "dir"
    retain: int = DEFAULT_RETAIN
    immutable: bool = False
    health_cmd: tuple[str, ...] = ()
    health_seconds: float = 30.0
    auto_apply: bool = True
    # Install set-id files others can write and world-writable directories
    # without the sticky bit (protocol.manifest.check_modes); refused unless set at init.
    allow_hazardous_modes: bool = False
    # This component is p2pupd itself (docs/self-update.md): a new version is
    # tried by restarting the daemon into it before it goes live.
    self_update: bool = False
    # The release variant this component installs, if not the node's platform
    # (p2pupd's own trees are per CPU *and* CPython: linux-x86_64-cp311).
    platform: str | None = None

    def to_value(self) -> dict[str, Any]:
        v = {
            "target": str(self.target),
            "kind": self.kind,
            "retain": self.retain,
            "immutable": self.immutable,
            "health_cmd": list(self.health_cmd),
            "health_ms": int(self.health_seconds * 1000),
            "auto_apply": self.auto_apply,
            "allow_hazardous_modes": self.allow_hazardous_modes,
        }
        # Written only when set, so other components' documents keep their bytes
        # (format 1 readers ignore both keys: state/stateformat.py).
        if self.self_update:
            v["self_update"] = True
        if self.platform is not None:
            v["platform"] = self.platform
        return v

    @classmethod
    def from_value(cls, name: str, v: dict[str, Any]) -> ComponentConfig:
        kind = v.get("kind", "dir")
        if kind not in TARGET_KINDS:
            raise ConfigError(f"component {name}: unknown target kind {kind!r}")
        return cls(
            name=name,
            target=Path(v["target"]),
            kind=kind,
            retain=int(v.get("retain", DEFAULT_RETAIN)),
            immutable=bool(v.get("immutable", False)),
            health_cmd=tuple(v.get("health_cmd", [])),
            health_seconds=int(v.get("health_ms", 30000)) / 1000,
            auto_apply=bool(v.get("auto_apply", True)),
            allow_hazardous_modes=bool(v.get("allow_hazardous_modes", False)),
            self_update=bool(v.get("self_update", False)),
            platform=None if v.get("platform") is None else ids.check_platform(v["platform"]),
        )


@dataclass(frozen=True)
class HookLimits:
    """What one WebAssembly hook may use on this node (``p2pupd init --hook-*``).

    A node's operator, not the publisher, sets these: the limits protect the
    node, so a release cannot raise them for itself.
    """

    fuel: int = HOOK_DEFAULT_FUEL  # instructions, roughly
    memory_bytes: int = HOOK_DEFAULT_MEMORY_BYTES  # linear memory
    seconds: float = HOOK_DEFAULT_SECONDS  # wall clock, epoch deadline

    def __post_init__(self) -> None:
        if self.fuel <= 0 or self.memory_bytes <= 0 or self.seconds <= 0:
            raise ConfigError("hook limits must be positive")

    def to_value(self) -> dict[str, Any]:
        return {"fuel": self.fuel, "memory": self.memory_bytes, "ms": int(self.seconds * 1000)}

    @classmethod
    def from_value(cls, v: Any) -> HookLimits:
        """Read limits written by ``to_value``; absent fields (older configs) default."""
        if v is None:
            return cls()
        return cls(
            int(v.get("fuel", HOOK_DEFAULT_FUEL)),
            int(v.get("memory", HOOK_DEFAULT_MEMORY_BYTES)),
            int(v.get("ms", HOOK_DEFAULT_SECONDS * 1000)) / 1000,
        )


MAX_FORMER_IDS = 4


@dataclass(frozen=True)
class NodeConfig:
    node_id: bytes
    platform: str
    components: dict[str, ComponentConfig]
    cluster: str = "default"
    hooks: HookLimits = field(default_factory=HookLimits)
    # Ids this node had before its id became the hash of its node key
    # (protocol/fleet/identity.py): bundles cut for requests made under them
    # still import. At most MAX_FORMER_IDS, newest first.
    former_node_ids: tuple[bytes, ...] = ()

    def component(self, name: str) -> ComponentConfig:
        try:
            return self.components[name]
        except KeyError:
            raise NotFoundError(f"component {name!r} is not configured on this node") from None

    def platform_of(self, name: str) -> str:
        """The release variant component ``name`` installs (its own, else the node's)."""
        comp = self.components.get(name)
        return comp.platform if comp is not None and comp.platform else self.platform

    def to_value(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "platform": self.platform,
            "cluster": self.cluster,
            "components": {n: c.to_value() for n, c in self.components.items()},
            "hooks": self.hooks.to_value(),
            **({"former_node_ids": list(self.former_node_ids)} if self.former_node_ids else {}),
        }

    @classmethod
    def from_value(cls, v: Any) -> NodeConfig:
        try:
            comps = {
                ids.check_component(n): ComponentConfig.from_value(n, c)
                for n, c in v["components"].items()
            }
            return cls(
                bytes(v["node_id"]),
                str(v["platform"]),
                comps,
                str(v.get("cluster", "default")),
                HookLimits.from_value(v.get("hooks")),
                tuple(bytes(f) for f in v.get("former_node_ids", ()))[:MAX_FORMER_IDS],
            )
        except (KeyError, TypeError, ValueError, AttributeError, CodecError) as exc:
            raise ConfigError(f"node configuration is invalid: {exc}") from None


@dataclass(frozen=True)
class HistoryEntry:
    time: int
    # "applied", "rolled-back", "health-failed", "interrupted", "refused", "imported", ...
    event: str
    serial: int | None
    version: str | None
    detail: str = ""

    def to_value(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "event": self.event,
            "serial": self.serial,
            "version": self.version,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ComponentState:
    installed: int | None = None  # serial live at the target
    kept: tuple[int, ...] = ()  # previous serials still on disk, newest first
    high_water: int = 0  # highest serial ever accepted (rollback protection)
    high_digest: bytes | None = None  # payload digest of that release
    bad: dict[int, str] = field(default_factory=dict)  # serial -> why it failed here
    last_error: str | None = None
    # serial -> how often an apply of it was cut off between swap and commit (a
    # crash, a power cut): retried, and marked bad only after a few (recovery.py)
    interrupted: dict[int, int] = field(default_factory=dict)
    history: tuple[HistoryEntry, ...] = ()

    def with_event(self, entry: HistoryEntry) -> ComponentState:
        return replace(self, history=(*self.history, entry)[-HISTORY_LIMIT:])

    def to_value(self) -> dict[str, Any]:
        return {
            "installed": self.installed,
            "kept": list(self.kept),
            "high_water": self.high_water,
            "high_digest": self.high_digest,
            "bad": [[s, r] for s, r in sorted(self.bad.items())],
            "last_error": self.last_error,
            "history": [h.to_value() for h in self.history],
            "interrupted": [[s, n] for s, n in sorted(self.interrupted.items())],
        }

    @classmethod
    def from_value(cls, v: Any) -> ComponentState:
        return cls(
            installed=v["installed"],
            kept=tuple(v["kept"]),
            high_water=v["high_water"],
            high_digest=v["high_digest"],
            bad={int(s): str(r) for s, r in v["bad"]},
            last_error=v["last_error"],
            history=tuple(HistoryEntry(**h) for h in v["history"]),
            interrupted={int(s): int(n) for s, n in v.get("interrupted", [])},
        )


class StateDir:
    """Paths and documents of one node's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "config.msgpack"
        self.config_backup_path = root / "config.backup.msgpack"
        self.state_path = root / "state.msgpack"
        self.trust_dir = root / "trust"
        self.releases_dir = root / "releases"
        self.journal_dir = root / "journal"
        self.lock_path = root / "lock"
        self.cache_dir = root / "cache"

    def exists(self) -> bool:
        return self.config_path.exists()

    def check_layout(self) -> None:
        """Raise ``StateLayoutError`` (one line, exit code 2) if a member of the
        state directory is a symlink or not the kind p2pupd made it.

        Called whenever the node is opened, so no command reads, writes or
        cleans anything through a planted link (``STATE/tmp -> /``). The root
        itself may be a link: it is the operator's argument.
        """
        try:
            fd = members.open_dir(self.root)
        except StorageError:
            return  # no state directory (yet): read_config says so
        try:
            for rel, kind in STATE_LAYOUT:
                parent, _, _ = rel.rpartition("/")
                if parent and not os.path.isdir(self.root / parent):
                    continue  # its parent is absent (checked itself, above)
                members.check(self.root, rel, kind, None if parent else fd)
            for sub in ("trust", "journal", "releases"):
                if os.path.isdir(self.root / sub):
                    self._check_entries(sub, members.DIR if sub == "releases" else None)
        finally:
            os.close(fd)

    def _check_entries(self, sub: str, kind: int | None) -> None:
        """No entry of ``sub`` may be a symlink (and each must be ``kind`` if given)."""
        fd = members.open_dir(self.root, sub)
        try:
            for name in os.listdir(fd):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) or (
                    kind is not None and stat.S_IFMT(st.st_mode) != kind
                ):
                    raise members.layout_error(self.root, f"{sub}/{name}", st, kind or members.FILE)
        except OSError as exc:
            raise storage_error(exc, "inspect", self.root / sub) from None
        finally:
            os.close(fd)

    def create(self, config: NodeConfig) -> None:
        """Create the directory skeleton and write the configuration."""
        try:
            for d in (
                self.root,
                self.trust_dir,
                self.releases_dir,
                self.journal_dir,
                self.cache_dir,
            ):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create state directory {self.root}: {exc.strerror}"
            ) from None
        self.check_layout()
        self.migrate()  # a new directory is simply marked; an older one migrated
        self.write_config(config)
        if not self.state_path.exists():
            self.write_states({})

    def check_format(self) -> None:
        """Refuse a state directory of a format this code does not understand
        (``StateFormatError``, one line, exit code 2): see stateformat.py."""
        stateformat.check(self.root)

    def migrate(self, upto_reader: int | None = None) -> list[str]:
        """Bring the directory to this code's format; the caller holds the node lock."""
        return stateformat.migrate(self.root, upto_reader)

    def read_config(self) -> NodeConfig:
        self.check_layout()
        self.check_format()
        if not self.config_path.exists():
            raise ConfigError(
                f"{self.root} is not an initialised p2pupd state directory (run `p2pupd init`)"
            )
        try:
            data = self.config_path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {self.config_path}: {exc.strerror}") from None
        try:
            return NodeConfig.from_value(encoding.decode(data))
        except (CodecError, ConfigError) as exc:
            raise ConfigError(
                f"{self.config_path} is damaged ({exc}); `p2pupd config repair` rebuilds it, "
                "keeping the node id"
            ) from None

    def write_config(self, config: NodeConfig) -> None:
        """Write the configuration, then its backup copy (each atomically).

        The copy is what ``p2pupd config repair`` restores when the first one
        is damaged (a bad sector, a stray edit); a crash between the two
        writes leaves one old and one new valid document, never a torn one.
        """
        data = encoding.encode(config.to_value())
        atomic_write(self.config_path, data, mode=0o600)
        atomic_write(self.config_backup_path, data, mode=0o600)

    def read_states(self) -> dict[str, ComponentState]:
        if not self.state_path.exists():
            return {}
        v = self._read(self.state_path)
        try:
            return {n: ComponentState.from_value(s) for n, s in v.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{self.state_path} is damaged: {exc}") from None

    def read_state(self, name: str) -> ComponentState:
        return self.read_states().get(name, ComponentState())

    def write_states(self, states: dict[str, ComponentState]) -> None:
        atomic_write(
            self.state_path,
            encoding.encode({n: s.to_value() for n, s in sorted(states.items())}),
            mode=0o600,
        )

    def update_state(self, name: str, state: ComponentState) -> None:
        states = self.read_states()
        states[name] = state
        self.write_states(states)

    def _read(self, path: Path) -> Any:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return encoding.decode(data)
        except CodecError as exc:
            raise StorageError(f"{path} is damaged: {exc}") from None


def new_node_id() -> bytes:
    return secrets.token_bytes(16)


NOW_ENV = "P2PUPD_NOW"


def now_seconds() -> int:
    """Wall-clock seconds for history entries and expiry checks.

    ``P2PUPD_NOW`` overrides the clock (a site whose clock is known to be
    wrong; tests): whole seconds since 1970-01-01 UTC (``1803902400``), or an
    ISO-8601 time (``2027-03-01T12:00:00Z``; UTC unless it names an offset; a
    date alone is its midnight UTC). Raises ``ConfigError`` for anything else.
    """
    override = os.environ.get(NOW_ENV)
    if override:
        return parse_instant(override.strip())
    import time

    return int(time.time())


def parse_instant(text: str) -> int:
    """Seconds since the epoch of ``text`` (see ``now_seconds``); ``ConfigError`` if odd."""
    if text.lstrip("-").isdigit():
        return int(text)
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{NOW_ENV}={text!r} is not a time: give seconds since 1970-01-01 UTC "
            "(e.g. 1803902400) or ISO-8601 UTC (e.g. 2027-03-01T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())
