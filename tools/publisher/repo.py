"""The publisher's repository: trust roots, signed releases and their blobs.

Layout (the blob directory is the same OCI blob layout a node's store uses):

    REPO/root.msgpack              the current root: what operators install on nodes
    REPO/roots/<N>.msgpack         every root version, for nodes that must walk forward
    REPO/repo.msgpack              publisher settings: release key files, delta depth
    REPO/releases/<c>/<serial>.msgpack   signed release envelopes (universal)
    REPO/releases/<c>/<serial>.<platform>.msgpack   one platform variant of a release
    REPO/blobs/sha256/<hex>        chunks, patches and hooks

Every document is written with temp + fsync + rename.

A release is either universal (one manifest, no platform) or a set of
platform variants sharing one serial and version, each its own signed manifest
naming its platform; a serial never holds both kinds, so a node always knows
whether a release has something for it. Chunks common to variants are one blob.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon.api import BlobStore, atomic_write
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import CodecError, P2pupdError, ThresholdError, UnknownKeyError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.patchcodec import PATCH_FORMAT
from p2pupd.protocol.trust import (
    ROOT_TYPE,
    Envelope,
    Role,
    Root,
    TrustChain,
    TrustedRoot,
    key_id,
    sign,
)
from p2pupd.tools.publisher.keys import load_private, load_public


class RepoError(P2pupdError):
    """The repository is missing, damaged or misused (exit code 1)."""


@dataclass(frozen=True)
class RepoSettings:
    release_keys: tuple[str, ...]
    delta_depth: int = 2
    # The newest patch format releases may use (protocol/patchcodec.py): what
    # the oldest p2pupd among the repository's nodes applies. A repository
    # made before the setting existed (whose nodes may run p2pupd 0.1.0) has
    # 1; ``repo init`` records the newest, since a new root starts a new fleet.
    patch_format: int = 1

    def to_value(self) -> dict[str, Any]:
        return {"release_keys": list(self.release_keys), "delta_depth": self.delta_depth,
                "patch_format": self.patch_format}  # fmt: skip


class Repo:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.root_path = path / "root.msgpack"
        self.roots_dir = path / "roots"
        self.releases_dir = path / "releases"
        self.settings_path = path / "repo.msgpack"

    @property
    def store(self) -> BlobStore:
        return BlobStore(self.path)

    def exists(self) -> bool:
        return self.root_path.exists()

    def require(self) -> None:
        if not self.exists():
            raise RepoError(f"{self.path} is not a p2pupd repository (run `p2pupd repo init`)")

    # -- roots -----------------------------------------------------------------

    def init(
        self,
        root_keys: list[Path],
        threshold: int,
        release_keys: list[Path],
        release_threshold: int = 1,
        name: str = "p2pupd",
        expires: int | None = None,
        patch_format: int = PATCH_FORMAT,
    ) -> TrustedRoot:
        """Create the repository with root v1 signed by ``root_keys``; its releases'
        patches of at most ``patch_format`` (see ``RepoSettings``)."""
        if self.exists():
            raise RepoError(f"{self.path} already holds a repository")
        privs = [load_private(k) for k in root_keys]
        rel_pubs = [load_public(k) for k in release_keys]
        root = _make_root(1, privs, threshold, rel_pubs, release_threshold, name, expires)
        env = sign(ROOT_TYPE, root.encode(), privs)
        for d in (self.path, self.roots_dir, self.releases_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_root(env)
        atomic_write(
            self.settings_path,
            encoding.encode(
                RepoSettings(
                    tuple(str(k.resolve()) for k in release_keys), patch_format=patch_format
                ).to_value()
            ),
        )
        return TrustedRoot.load(env.encode())

    def rotate_root(
        self,
        old_keys: list[Path],
        new_keys: list[Path],
        threshold: int,
        release_keys: list[Path] | None,
        release_threshold: int | None = None,
        expires: int | None = None,
        revoke: list[str] | None = None,
    ) -> TrustedRoot:
        """Write root N+1 with ``new_keys``, signed by old and new root keys.

        ``revoke`` names compromised keys (key ids or public key files): the
        new root lists them as revoked, so every node refuses what they signed,
        even releases it accepted earlier (``TrustChain``). Revocations of
        earlier roots are carried forward. The signature check is the node's
        own (``TrustedRoot.rotate``): a rotation this writes is one a node accepts.
        """
        cur = self.trusted()
        old_privs = [load_private(k) for k in old_keys]
        new_privs = [load_private(k) for k in new_keys]
        if release_keys:
            rel_pubs = [load_public(k) for k in release_keys]
            rel_thr = release_threshold or 1
        else:
            rel = cur.root.roles["release"]
            rel_pubs = [cur.root.keys[k] for k in rel.keyids]
            rel_thr = release_threshold or rel.threshold
        revoked = set(cur.root.revoked) | {_key_id_of(k) for k in revoke or ()}
        root = _make_root(
            cur.version + 1, new_privs, threshold, rel_pubs, rel_thr, cur.root.name, expires
        )
        if revoked & (set(root.roles["root"].keyids) | set(root.roles["release"].keyids)):
            raise RepoError("a revoked key cannot also be a key of the new root")
        root = replace(root, revoked=tuple(sorted(revoked)))
        signers = {key_id(k.public_key().public_bytes_raw()): k for k in old_privs + new_privs}
        env = sign(ROOT_TYPE, root.encode(), signers.values())
        new = cur.rotate(env.encode())
        self._write_root(env)
        if release_keys:
            s = self.settings()
            atomic_write(
                self.settings_path,
                encoding.encode(
                    replace(s, release_keys=tuple(str(k.resolve()) for k in release_keys)).to_value()
                ),
            )
        return new

    def trusted(self) -> TrustedRoot:
        self.require()
        try:
            return TrustedRoot.load(self.root_path.read_bytes())
        except OSError as exc:
            raise RepoError(f"cannot read {self.root_path}: {exc.strerror}") from None

    def roots(self) -> dict[int, bytes]:
        out = {}
        for p in sorted(self.roots_dir.glob("*.msgpack")):
            try:
                out[int(p.stem)] = p.read_bytes()
            except (ValueError, OSError):
                continue
        return out

    def _write_root(self, env: Envelope) -> None:
        data = env.encode()
        root = Root.from_value(encoding.decode(env.payload, limits.MAX_ROOT_BYTES))
        atomic_write(self.roots_dir / f"{root.version}.msgpack", data)
        atomic_write(self.root_path, data)

    # -- settings and keys ----------------------------------------------------------

    def settings(self) -> RepoSettings:
        self.require()
        try:
            v = encoding.decode(self.settings_path.read_bytes())
            return RepoSettings(
                tuple(v["release_keys"]), int(v.get("delta_depth", 2)),
                int(v.get("patch_format", 1)),
            )  # fmt: skip
        except (OSError, CodecError, KeyError, TypeError, ValueError) as exc:
            raise RepoError(f"cannot read {self.settings_path}: {exc}") from None

    def release_signers(self, override: list[Path] | None = None) -> list[Ed25519PrivateKey]:
        paths = override or [Path(p) for p in self.settings().release_keys]
        return [load_private(p) for p in paths]

    # -- releases -------------------------------------------------------------

    def release_path(self, component: str, serial: int, platform: str | None = None) -> Path:
        """Path of the universal release (``platform`` None) or of one variant."""
        name = f"{serial}.msgpack" if platform is None else f"{serial}.{platform}.msgpack"
        return self.releases_dir / component / name

    def _entries(self, component: str) -> dict[int, list[str | None]]:
        """Serial -> platforms stored (``None`` = universal), from the file names."""
        d = self.releases_dir / component
        out: dict[int, list[str | None]] = {}
        for p in d.glob("*.msgpack") if d.is_dir() else []:
            head, _, platform = p.name.removesuffix(".msgpack").partition(".")
            try:
                serial = int(head)
                if platform:
                    ids.check_platform(platform)
            except (ValueError, CodecError):
                continue  # not a release file (a temp file, a stray copy)
            out.setdefault(serial, []).append(platform or None)
        return out

    def serials(self, component: str) -> list[int]:
        """Serials of ``component``, oldest first (a release with variants counts once)."""
        return sorted(self._entries(component))

    def platforms(self, component: str, serial: int) -> list[str | None]:
        """Platforms of the release ``serial``: ``[None]`` when universal, else its variants."""
        return sorted(self._entries(component).get(serial, []), key=lambda p: p or "")

    def components(self) -> list[str]:
        if not self.releases_dir.is_dir():
            return []
        return sorted(p.name for p in self.releases_dir.iterdir() if p.is_dir())

    def release_bytes(self, component: str, serial: int, platform: str | None = None) -> bytes:
        """Return the envelope of the universal release or of variant ``platform``.

        Raises ``RepoError`` if it is not there (naming the variants when the
        release has only those).
        """
        path = self.release_path(component, serial, platform)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            variants = [p for p in self.platforms(component, serial) if p is not None]
            if platform is None and variants:
                raise RepoError(
                    f"release {component}/{serial} has only platform variants "
                    f"({', '.join(variants)}): name one"
                ) from None
            raise RepoError(f"release {component}/{serial} ({platform or 'universal'}) "
                            "does not exist") from None  # fmt: skip
        except OSError as exc:
            raise RepoError(f"cannot read release {component}/{serial}: {exc.strerror}") from None

    def label(self, component: str, serial: int) -> str | None:
        """The version label of release ``serial`` (any variant), read without verifying.

        For the publisher's own checks (``publish`` refusing a label used
        before), never for trust: it decodes the payload map only, not a
        ``Manifest``, so a repository of many large releases is scanned fast.
        ``None`` if it cannot be read.
        """
        for platform in self.platforms(component, serial):
            try:
                data = self.release_bytes(component, serial, platform)
                env = Envelope.decode(data, limits.MAX_MANIFEST_BYTES)
                label = encoding.decode(env.payload).get("version")
            except (P2pupdError, AttributeError):
                continue
            return label if isinstance(label, str) else None
        return None

    def release(
        self, component: str, serial: int, platform: str | None = None
    ) -> tuple[Manifest, Envelope]:
        """Return the verified universal release ``serial`` or its ``platform`` variant."""
        return self._verify(self.release_bytes(component, serial, platform), component)

    def variants(self, component: str, serial: int) -> list[tuple[Manifest, Envelope]]:
        """Return every manifest of release ``serial`` (one when universal), verified."""
        return [
            self._verify(self.release_bytes(component, serial, p), component)
            for p in self.platforms(component, serial)
        ]

    def chain(self) -> TrustChain:
        """Every root of the repository: what its stored releases verify under."""
        return TrustChain.from_history(self.roots(), self.trusted())

    def _verify(self, data: bytes, component: str) -> tuple[Manifest, Envelope]:
        """Verify a release of this repository under the root it was signed under.

        The rule is a node's for releases it holds (``TrustChain.verify_held``):
        the newest root of the chain whose release role signs it, unless a root
        revokes its key. Nodes accept a release *arriving* only under their
        current root: see ``signed_under_current``.
        """
        return self.chain().verify_held(data, component)[:2]

    def signed_under_current(self, data: bytes, component: str) -> bool:
        """Would a node accept this release today (signed under the current root)?"""
        try:
            self.trusted().verify_release(data, None, component)
        except (UnknownKeyError, ThresholdError):
            return False
        return True

    def write_release(self, man: Manifest, env: Envelope) -> None:
        """Write a signed release; refuse a duplicate or mixing universal and variants.

        Raises ``RepoError``.
        """
        d = self.releases_dir / man.component
        d.mkdir(parents=True, exist_ok=True)
        held = self.platforms(man.component, man.serial)
        what = f"release {man.component} serial {man.serial}"
        if man.platform in held:
            variant = f" for {man.platform}" if man.platform else ""
            raise RepoError(f"{what}{variant} already exists")
        if held and (man.platform is None or None in held):
            raise RepoError(
                f"{what} cannot be both universal and per-platform "
                f"(it has {', '.join(p or 'universal' for p in held)})"
            )
        atomic_write(self.release_path(man.component, man.serial, man.platform), env.encode())


def _key_id_of(text: str) -> str:
    """A key id given as hex, or the id of the public key in file ``text``."""
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text
    return key_id(load_public(Path(text)))


def _make_root(
    version: int,
    root_privs: list[Ed25519PrivateKey],
    threshold: int,
    release_pubs: list[bytes],
    release_threshold: int,
    name: str,
    expires: int | None,
) -> Root:
    root_pubs = [k.public_key().public_bytes_raw() for k in root_privs]
    keys = {key_id(p): p for p in root_pubs + release_pubs}
    if not 1 <= threshold <= len(set(root_pubs)):
        raise RepoError(f"threshold {threshold} needs 1..{len(set(root_pubs))} root keys")
    if not 1 <= release_threshold <= len(set(release_pubs)):
        raise RepoError(f"release threshold {release_threshold} needs that many release keys")
    return Root(
        version=version,
        keys=keys,
        roles={
            "root": Role(tuple(sorted({key_id(p) for p in root_pubs})), threshold),
            "release": Role(tuple(sorted({key_id(p) for p in release_pubs})), release_threshold),
        },
        expires=expires,
        name=name,
    )
