"""The node's side of site membership: the pinned site, its credential, the site's seal key.

Theory of operation. Files, all under ``STATE`` (the rules they are checked
by live in protocol/membership.py):

    site/site.<v>.msgpack   the site documents: v1 pinned by ``init --site``
                            (or the config file), later ones accepted by rotation
    site/credential.der     this node's X.509 credential (from ``site join``)
    site/seal.msgpack       the site's X25519 seal key, sealed to this node's box key
    site/revocations.msgpack  the newest revocation list accepted
    node.box                this node's X25519 box key (raw, 0600, made on first use)

A node with no ``site/`` directory belongs to no site and keeps the open
behaviour (anyone with the root may join its swarm); ``status`` and the
daemon's start-up say so. The seal key is kept sealed at rest: it opens only
with ``node.box``, which never leaves the node, and it is unsealed in memory
when a sealed bundle is imported. A credential that expired stays installed
(``status`` shows it): the node keeps running what it has, and ``site join``
of a fresh credential replaces it.

Every document is re-verified when read (storage can rot, and a copied state
dir must not carry another node's membership).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pupd.daemon.errors import ConfigError, CorruptStoreError, StorageError
from p2pupd.daemon.fsutil import atomic_write
from p2pupd.daemon.state.statedir import StateDir
from p2pupd.protocol import encoding
from p2pupd.protocol.errors import CodecError, P2pupdError, VerificationError
from p2pupd.protocol.site.membership import (
    Credential,
    Membership,
    RevocationList,
    TrustedSite,
    membership_context,
    newer_revocations,
    parse_credential,
)
from p2pupd.protocol.site.sealed import open_sealed, x25519_public

BOX_KEY_FILE = "node.box"
SECRET_MODE = 0o600


@dataclass(frozen=True)
class MemberState:
    """What a node knows of its membership, checked (``status`` shows it)."""

    site: TrustedSite | None
    credential: Credential | None
    problem: str | None  # why the credential does not admit the node now, if it does not
    revocations: RevocationList | None


class MembershipStore:
    """The membership files of one state directory (see the module docstring)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.dir = state.root / "site"
        self.cred_path = self.dir / "credential.der"
        self.seal_path = self.dir / "seal.msgpack"
        self.rl_path = self.dir / "revocations.msgpack"
        self.box_path = state.root / BOX_KEY_FILE

    # -- the site ---------------------------------------------------------------------

    def _chain(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        except OSError as exc:
            raise StorageError(f"cannot list {self.dir}: {exc.strerror}") from None
        for name in names:
            parts = name.split(".")
            if (
                len(parts) == 3
                and parts[0] == "site"
                and parts[1].isdigit()
                and parts[2] == "msgpack"
            ):
                out[int(parts[1])] = _read(self.dir / name)
        return out

    def site(self) -> TrustedSite | None:
        """The site this node belongs to (None: no site configured)."""
        chain = self._chain()
        if not chain:
            return None
        try:
            return TrustedSite.from_chain(chain)
        except (VerificationError, CodecError) as exc:
            raise CorruptStoreError(f"site documents in {self.dir} are damaged: {exc}") from None

    def pin(self, data: bytes) -> TrustedSite:
        """Pin the site document ``data`` (``init --site``); raises if it is not one.

        A node pinned to another site is not re-pinned (``ConfigError``): its
        credential would be worthless, and leaving a site is an explicit act
        (delete ``STATE/site``).
        """
        site = TrustedSite.load(data)
        held = self.site()
        if held is not None:
            if site.current.key_id in {d.key_id for d in held.docs.values()}:
                return held
            raise ConfigError(
                f"this node is pinned to site {held.name!r} (key {held.current.key_id[:16]}); "
                f"refusing to re-pin it to {site.name!r} (remove {self.dir} to leave the site)"
            )
        self._mkdir()
        atomic_write(self.dir / f"site.{site.version}.msgpack", data, mode=SECRET_MODE)
        return site

    def advance(self, data: bytes) -> TrustedSite:
        """Accept the next site document (a site key rotation); returns the site after it.

        Raises ``RollbackError`` unless it is exactly the next version, and a
        signature error unless the old and the new site keys both signed it.
        """
        site = self.site()
        if site is None:
            raise ConfigError("this node has no site pinned")
        new = site.rotate(data)
        atomic_write(self.dir / f"site.{new.version}.msgpack", data, mode=SECRET_MODE)
        return new

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror}") from None

    # -- the box key -----------------------------------------------------------------------

    def box_key(self, create: bool = False) -> X25519PrivateKey | None:
        """This node's X25519 box key (made on first use when ``create``; caller holds the lock)."""
        try:
            raw = self.box_path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
            key = X25519PrivateKey.generate()
            atomic_write(self.box_path, key.private_bytes_raw(), mode=SECRET_MODE)
            return key
        except OSError as exc:
            raise StorageError(f"cannot read {self.box_path}: {exc.strerror}") from None
        if len(raw) != 32:
            raise CorruptStoreError(f"box key {self.box_path} is damaged (expected 32 bytes)")
        return X25519PrivateKey.from_private_bytes(raw)

    # -- membership ------------------------------------------------------------------------

    def install(self, m: Membership) -> None:
        """Record a verified membership (``site join``): chain, credential, sealed seal key."""
        self._mkdir()
        for v, data in m.site.envelopes.items():
            atomic_write(self.dir / f"site.{v}.msgpack", data, mode=SECRET_MODE)

        atomic_write(
            self.seal_path, encoding.encode({"epk": m.epk, "sealed": m.sealed}), mode=SECRET_MODE
        )
        atomic_write(self.cred_path, m.credential.der, mode=SECRET_MODE)
        if m.revocations is not None and m.revocations_bytes is not None:
            self.update_revocations(m.site, m.revocations, m.revocations_bytes)

    def credential_bytes(self) -> bytes | None:
        try:
            return self.cred_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.cred_path}: {exc.strerror}") from None

    def revocations(self, site: TrustedSite) -> tuple[RevocationList, bytes] | None:
        try:
            data = self.rl_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.rl_path}: {exc.strerror}") from None
        try:
            return site.verify_revocations(data), data
        except (VerificationError, CodecError) as exc:
            raise CorruptStoreError(f"{self.rl_path} is damaged: {exc}") from None

    def update_revocations(self, site: TrustedSite, rl: RevocationList, data: bytes) -> bool:
        """Keep ``rl`` if it is newer than the list held (rule 9); True if it changed anything.

        Raises ``RollbackError`` for an older list or another list under the held sequence.
        """
        held = self.revocations(site)
        if not newer_revocations(held[0] if held else None, held[1] if held else None, rl, data):
            return False
        self._mkdir()
        atomic_write(self.rl_path, data, mode=SECRET_MODE)
        return True

    def seal_keys(self, node_id: bytes) -> list[X25519PrivateKey]:
        """The site seal key(s) this node can open sticks with (none if not a member)."""
        site = self.site()
        box = self.box_key()
        if site is None or box is None:
            return []
        try:
            v = encoding.decode(_read(self.seal_path))
        except FileNotFoundError:
            return []
        except CodecError:
            raise CorruptStoreError(f"{self.seal_path} is damaged") from None
        if not isinstance(v, dict) or not isinstance(v.get("epk"), bytes):
            raise CorruptStoreError(f"{self.seal_path} is damaged")
        raw = open_sealed(v["epk"], v.get("sealed", b""), box, membership_context(node_id))
        if raw is None or len(raw) != 32:
            raise CorruptStoreError(
                f"{self.seal_path} does not open with this node's box key (copied state?)"
            )
        key = X25519PrivateKey.from_private_bytes(raw)
        if x25519_public(key) not in {d.seal for d in site.docs.values()}:
            raise CorruptStoreError(f"{self.seal_path} is not the seal key of site {site.name!r}")
        return [key]

    def member_state(self, node_id: bytes, node_key: bytes | None, now: int) -> MemberState:
        """The node's membership as it stands at ``now`` (never raises for a bad credential)."""
        site = self.site()
        if site is None:
            return MemberState(None, None, "no site configured", None)
        rl = self.revocations(site)
        der = self.credential_bytes()
        if der is None:
            return MemberState(site, None, "not enrolled (no credential)", rl[0] if rl else None)

        try:
            cred = parse_credential(der)
        except CodecError as exc:
            return MemberState(site, None, f"credential damaged: {exc}", rl[0] if rl else None)
        problem = None
        try:
            site.check_credential(der, now, rl[0] if rl else None)
            if cred.node_id != node_id or (node_key is not None and cred.node_key != node_key):
                problem = "credential is another node's"
        except (VerificationError, CodecError) as exc:
            problem = str(exc)
        return MemberState(site, cred, problem, rl[0] if rl else None)

    def status_doc(self, node_id: bytes, node_key: bytes | None, now: int) -> dict[str, Any]:
        """The ``site`` part of ``status --json``."""
        try:
            ms = self.member_state(node_id, node_key, now)
        except P2pupdError as exc:
            return {"configured": True, "member": False, "problem": str(exc)}
        if ms.site is None:
            return {
                "configured": False,
                "member": False,
                "problem": "no site configured: any host with the root may join this node's swarm",
            }
        cred = ms.credential
        return {
            "configured": True,
            "name": ms.site.name,
            "site_key": ms.site.current.key_id,
            "version": ms.site.version,
            "member": cred is not None and ms.problem is None,
            "problem": ms.problem,
            "credential": None
            if cred is None
            else {"serial": f"{cred.serial:x}", "expires": cred.not_after, "issuer": cred.issuer},
            "revocations": None
            if ms.revocations is None
            else {"sequence": ms.revocations.sequence, "revoked": len(ms.revocations.entries)},
        }



def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
