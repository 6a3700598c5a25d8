"""The node's trusted metadata: pinned root and verified release envelopes.

Theory of operation: this module is the only writer of ``trust/`` and
``releases/`` (the node's own releases, and beside them the other platforms'
variants it carries for its neighbours: ``CarriedStore``, rules in carried.py). Every document is verified *before* it is written, with the same
``TrustedRoot`` rules whatever its source (bundle, peer, publisher), so what is
on disk here is always something the node decided to trust. Reads re-verify
signatures (cheap) so a document altered on disk is caught, not acted on.
"""

from __future__ import annotations

from pathlib import Path

from p2pupd.daemon.errors import CorruptStoreError, NotFoundError, StorageError
from p2pupd.daemon.fsutil import atomic_write
from p2pupd.daemon.state.statedir import StateDir
from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, RevokedKeyError, VerificationError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, TrustChain, TrustedRoot


class TrustStore:
    """The pinned root and its rotation history."""

    def __init__(self, state: StateDir) -> None:
        self.dir = state.trust_dir
        self.current_path = self.dir / "root.msgpack"

    def install(self, data: bytes, now: int | None) -> TrustedRoot:
        """Pin the root in ``data`` (operator's choice, self-signature checked)."""
        trusted = TrustedRoot.load(data, now)
        self._write(trusted)
        return trusted

    def load(self) -> TrustedRoot:
        try:
            data = self.current_path.read_bytes()
        except FileNotFoundError:
            raise StorageError(
                "no trusted root is installed (run `p2pupd init --trust ROOTFILE`)"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.current_path}: {exc.strerror}") from None
        try:
            return TrustedRoot.load(data, None)
        except (CodecError, VerificationError) as exc:
            raise CorruptStoreError(f"pinned root on disk is damaged: {exc}") from None

    def advance(self, candidates: dict[int, bytes], now: int | None) -> TrustedRoot:
        """Rotate through root versions N+1, N+2, ... found in ``candidates``.

        Stops at the first version missing. Raises the verification error of
        the first candidate that fails, leaving the pinned root as it was.
        """
        current = self.load()
        trusted = current.walk(candidates, now, self.history())
        if trusted.version != current.version:
            self._write(trusted)
        return trusted

    def chain(self) -> TrustChain:
        """Every root accepted here, current last: verifies releases already held."""
        return TrustChain.from_history(self.history(), self.load())

    def history(self) -> dict[int, bytes]:
        """Return {version: envelope bytes} of every root accepted."""
        out: dict[int, bytes] = {}
        for p in self.dir.glob("root.*.msgpack"):
            try:
                out[int(p.name.split(".")[1])] = p.read_bytes()
            except (ValueError, OSError):
                continue
        return out

    def _write(self, trusted: TrustedRoot) -> None:
        data = trusted.encode()
        atomic_write(self.dir / f"root.{trusted.version}.msgpack", data, mode=0o644)
        atomic_write(self.current_path, data, mode=0o644)


class ReleaseStore:
    """Verified release envelopes, by component and serial."""

    def __init__(self, state: StateDir) -> None:
        self.dir = state.releases_dir

    def path(self, component: str, serial: int) -> Path:
        return self.dir / ids.check_component(component) / f"{serial}.msgpack"

    def put(self, component: str, serial: int, envelope: Envelope) -> None:
        """Store an envelope the caller has verified."""
        d = self.dir / component
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {d}: {exc.strerror}") from None
        atomic_write(self.path(component, serial), envelope.encode(), mode=0o644)

    def has(self, component: str, serial: int) -> bool:
        return self.path(component, serial).exists()

    def get_bytes(self, component: str, serial: int) -> bytes:
        try:
            return self.path(component, serial).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"release {component} serial {serial} is not stored here") from None
        except OSError as exc:
            raise StorageError(
                f"cannot read release {component}/{serial}: {exc.strerror}"
            ) from None

    def get(self, chain: TrustChain, component: str, serial: int) -> tuple[Manifest, Envelope]:
        """Load and re-verify a stored release under the root chain (expiry is not re-judged).

        Raises ``NotFoundError``, ``StorageError``, ``RevokedKeyError`` (a root
        revoked a key it counts on) or ``CorruptStoreError`` (it no longer verifies).
        """
        data = self.get_bytes(component, serial)
        try:
            return chain.verify_held(data, component)[:2]
        except RevokedKeyError:
            raise
        except (CodecError, VerificationError) as exc:
            raise CorruptStoreError(
                f"stored release {component}/{serial} is damaged: {exc}"
            ) from None

    def serials(self, component: str) -> list[int]:
        d = self.dir / component
        out = []
        if d.is_dir():
            for p in d.glob("*.msgpack"):
                try:
                    out.append(int(p.stem))
                except ValueError:
                    continue
        return sorted(out)

    def components(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir())

    def remove(self, component: str, serial: int) -> None:
        try:
            self.path(component, serial).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot remove release {component}/{serial}: {exc.strerror}"
            ) from None


class CarriedStore:
    """Signed envelopes of other platforms' variants, by component, serial and platform."""

    def __init__(self, state: StateDir) -> None:
        self.dir = state.releases_dir

    def path(self, component: str, serial: int, platform: str) -> Path:
        name = f"{serial}.{ids.check_platform(platform)}.msgpack"
        return self.dir / ids.check_component(component) / name

    def put(self, component: str, serial: int, platform: str, envelope: Envelope) -> None:
        """Store an envelope the caller verified (``verify_carried``)."""
        d = self.dir / component
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {d}: {exc.strerror}") from None
        atomic_write(self.path(component, serial, platform), envelope.encode(), mode=0o644)

    def get_bytes(self, component: str, serial: int, platform: str) -> bytes:
        try:
            return self.path(component, serial, platform).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"variant {component}/{serial} for {platform} is not carried here"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot read variant {component}/{serial} for {platform}: {exc.strerror}"
            ) from None

    def get(
        self, chain: TrustChain, component: str, serial: int, platform: str
    ) -> tuple[Manifest, Envelope]:
        """Load and re-verify a carried variant. Raises ``NotFoundError``,
        ``StorageError``, ``RevokedKeyError`` or ``CorruptStoreError``."""
        data = self.get_bytes(component, serial, platform)
        try:
            man, env, _ = chain.verify_held(data, component)
        except RevokedKeyError:
            raise
        except (CodecError, VerificationError) as exc:
            raise CorruptStoreError(
                f"carried variant {component}/{serial} for {platform} is damaged: {exc}"
            ) from None
        if (man.serial, man.platform) != (serial, platform):
            raise CorruptStoreError(f"carried variant {component}/{serial} for {platform} "
                                    "holds another release")  # fmt: skip
        return man, env

    def carried(self, component: str) -> list[tuple[int, str]]:
        """(serial, platform) of every variant of ``component`` carried, sorted."""
        d = self.dir / component
        out = []
        if d.is_dir():
            for p in d.glob("*.*.msgpack"):
                head, _, platform = p.name.removesuffix(".msgpack").partition(".")
                try:
                    out.append((int(head), ids.check_platform(platform)))
                except (ValueError, CodecError):
                    continue
        return sorted(out)

    def platforms(self, component: str, serial: int) -> list[str]:
        """The platforms whose variant of (component, serial) is carried."""
        return [p for s, p in self.carried(component) if s == serial]

    def remove(self, component: str, serial: int, platform: str) -> None:
        try:
            self.path(component, serial, platform).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot remove variant {component}/{serial} for {platform}: {exc.strerror}"
            ) from None
