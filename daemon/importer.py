"""Import a bundle (a USB stick, a directory) into a node.

Theory of operation — the medium is read-only and untrusted:

1. Read ``oci-layout`` and ``index.json`` (bounded, never through a symlink).
2. Read every artifact manifest and every signed document they point to; each
   blob is opened ``O_NOFOLLOW`` by a name we build from a parsed digest
   (never from a string in the bundle), must be a regular file of the declared
   size, and must hash to its name.
3. Verify all of it in memory: walk the root chain from the pinned root, then
   verify every release envelope against the resulting root, its component
   against the artifact's annotation and the node's config, and its serial
   against the rollback high-water mark. Any failure here raises before a
   single byte is written.
4. Copy the blobs the *verified* manifests need and the store lacks, each
   streamed, hashed and renamed into place (so an interrupted import leaves
   only complete blobs and a rerun skips them: resume for free).
5. Only then persist the new root and the release envelopes and raise the
   high-water marks, each with an atomic write.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import HashMismatchError, MixAndMatchError, SchemaError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, Root, TrustedRoot, check_serial

from .errors import BundleError
from .node import HistoryEntry, now_seconds
from .node_ctx import Node


@dataclass
class ImportedRelease:
    component: str
    version: str
    serial: int
    new: bool
    blobs_copied: int = 0
    bytes_copied: int = 0


@dataclass
class ImportReport:
    root_version: int = 0
    releases: list[ImportedRelease] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    blobs_copied: int = 0
    blobs_present: int = 0
    bytes_copied: int = 0


class BundleReader:
    """Reads members of a bundle directory, refusing anything outside its layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            st = os.lstat(root)
        except OSError as exc:
            raise BundleError(f"cannot read bundle {root}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{root} is not a directory")

    def _open(self, rel: str) -> int:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in rel.split("/")[:-1]:
                nfd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                os.close(fd)
                fd = nfd
            ffd = os.open(
                rel.rsplit("/", maxsplit=1)[-1],
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=fd,
            )
        except OSError as exc:
            os.close(fd)
            if exc.errno in (40, 20):  # ELOOP, ENOTDIR: a symlink where a file must be
                raise SchemaError(
                    f"bundle member {rel} is a symlink or not a regular file"
                ) from None
            if isinstance(exc, FileNotFoundError):
                raise SchemaError(f"bundle is missing {rel}") from None
            raise BundleError(f"cannot read bundle member {rel}: {exc.strerror}") from None
        os.close(fd)
        if not stat.S_ISREG(os.fstat(ffd).st_mode):
            os.close(ffd)
            raise SchemaError(f"bundle member {rel} is not a regular file")
        return ffd

    def read(self, rel: str, max_bytes: int) -> bytes:
        """Return the member's bytes; ``FrameTooLargeError``-like SchemaError over ``max_bytes``."""
        fd = self._open(rel)
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes:
                raise SchemaError(f"bundle member {rel} is {size} bytes, limit {max_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise BundleError(f"cannot read bundle member {rel}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise SchemaError(f"bundle member {rel} grew past its limit while being read")
        return data

    def blob_rel(self, digest: bytes) -> str:
        return f"blobs/sha256/{digest.hex()}"

    def read_blob(self, digest: bytes, size: int) -> bytes:
        """Return a blob's bytes after checking its size and hash."""
        data = self.read(self.blob_rel(digest), size)
        if len(data) != size:
            raise HashMismatchError(
                f"bundle blob {digest.hex()[:16]} is {len(data)} bytes, expected {size}"
            )
        ids.verify_digest(data, digest, f"bundle blob {digest.hex()[:16]}")
        return data

    def open_blob(self, digest: bytes) -> int:
        return self._open(self.blob_rel(digest))

    def has_blob(self, digest: bytes) -> bool:
        try:
            st = os.lstat(self.root / self.blob_rel(digest))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode)


@dataclass
class _Candidate:
    man: Manifest
    env: Envelope
    blobs: dict[bytes, int]


def read_bundle_metadata(
    reader: BundleReader, trusted: TrustedRoot, now: int | None
) -> tuple[TrustedRoot, dict[int, bytes], list[tuple[Manifest, Envelope, oci.Artifact]]]:
    """Read and verify every root and release in the bundle (no writes).

    Returns the root after rotation, the root documents by version, and each
    verified release with its artifact.
    """
    oci.parse_layout(reader.read("oci-layout", 4096))
    index = oci.parse_index(reader.read("index.json", limits.MAX_INDEX_BYTES))
    roots: dict[int, bytes] = {}
    releases: list[tuple[bytes, oci.Artifact]] = []
    for d in index:
        art = oci.parse_artifact(reader.read_blob(d.digest, d.size))
        if art.artifact_type == oci.TRUST_ARTIFACT:
            for layer in art.layers:
                data = reader.read_blob(layer.digest, min(layer.size, limits.MAX_ROOT_BYTES))
                env = Envelope.decode(data, limits.MAX_ROOT_BYTES)
                root = Root.from_value(encoding.decode(env.payload, limits.MAX_ROOT_BYTES))
                roots[root.version] = data
        else:
            releases.append((reader.read_blob(art.layers[0].digest, art.layers[0].size), art))
    while trusted.version + 1 in roots:
        trusted = trusted.rotate(roots[trusted.version + 1], now)
    verified = []
    for data, art in releases:
        man, env = trusted.verify_release(data, now)
        named = art.annotations.get(oci.ANNOTATION_COMPONENT)
        if named is not None and named != man.component:
            raise MixAndMatchError(
                f"bundle lists a release of {named!r} whose signed manifest is for {man.component!r}"
            )
        verified.append((man, env, art))
    return trusted, roots, verified


def import_bundle(
    node: Node,
    src: Path,
    now: int | None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ImportReport:
    """Verify and import the bundle at ``src`` into ``node``. See module doc.

    Raises a ``VerificationError`` (refused, nothing changed), a
    ``RemoteProtocolError`` (malformed bundle, nothing changed), or
    ``BundleError``/``StorageError`` (I/O; only complete verified blobs may
    have been added to the store).
    """
    reader = BundleReader(src)
    old_root = node.trusted_root()
    trusted, roots, verified = read_bundle_metadata(reader, old_root, now)
    report = ImportReport(root_version=trusted.version)
    states = node.state.read_states()
    todo: list[_Candidate] = []
    seen: dict[str, int] = {}
    for man, env, _art in verified:
        comp = node.config.components.get(man.component)
        if comp is None:
            report.skipped.append(f"{man.component} {man.version}: not configured on this node")
            continue
        if man.platform is not None and man.platform != node.config.platform:
            report.skipped.append(f"{man.component} {man.version}: for platform {man.platform}")
            continue
        st = states.get(man.component)
        high = st.high_water if st else 0
        held = st.high_digest if st else None
        is_new = check_serial(
            man, max(high, seen.get(man.component, 0)), held, env.payload_digest()
        )
        seen[man.component] = max(seen.get(man.component, 0), man.serial)
        if not is_new:
            report.releases.append(ImportedRelease(man.component, man.version, man.serial, False))
        todo.append(_Candidate(man, env, man.blob_sizes()))

    # Everything is verified. From here on only complete, hash-checked blobs
    # and atomically written documents are added.
    need: dict[bytes, int] = {}
    for c in todo:
        for dg, size in c.blobs.items():
            if not node.store.has(dg) and reader.has_blob(dg):
                need[dg] = size
    if on_total is not None:
        on_total(sum(need.values()))
    for dg, size in sorted(need.items()):
        fd = reader.open_blob(dg)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                n = node.store.put_stream(f, dg, size, progress)
        except OSError as exc:
            raise BundleError(f"cannot read bundle blob {dg.hex()[:16]}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if n != size:
            # put_stream verified the hash, so a short read can only mean the
            # manifest's size was wrong: that would be a signed lie.
            raise HashMismatchError(f"blob {dg.hex()[:16]} has {n} bytes, manifest says {size}")
        report.blobs_copied += 1
        report.bytes_copied += n
    report.blobs_present = sum(len(c.blobs) for c in todo) - report.blobs_copied

    if trusted.version != old_root.version:
        node.trust_store.advance(roots, now)
    for c in sorted(todo, key=lambda c: c.man.serial):
        man = c.man
        node.releases.put(man.component, man.serial, c.env)
        st = node.state.read_state(man.component)
        if man.serial > st.high_water:
            st = replace(st, high_water=man.serial, high_digest=c.env.payload_digest()).with_event(
                HistoryEntry(now_seconds(), "imported", man.serial, man.version, str(src))
            )
            node.state.update_state(man.component, st)
            report.releases.append(ImportedRelease(man.component, man.version, man.serial, True))
    return report
