"""Import a bundle (a USB stick, a directory) into a node.

Theory of operation -- the medium is read-only and untrusted (see reader.py
for how it is read), and nothing on the node changes until all of it checks out:

1. *Metadata.* Read ``oci-layout``, ``index.json``, every artifact and every
   signed document they point to (each hash-checked against its name, the lot
   bounded by ``bundle.MAX_METADATA_BYTES``), and every pack, to learn which
   blobs it holds. A release envelope carried as a patch is rebuilt from the
   envelope this node stores that it names (by sha256), then treated exactly
   as a whole one. A bundle whose patch needs a base this node lacks is refused
   (``MissingBaseError``, exit 1) if the node runs that component, else that
   release is skipped.
2. *Verify in memory.* Walk the root chain from the pinned root (a bundle root
   at a version we hold must be the one we hold: else it is another
   repository's), verify every release envelope (signatures, expiry on the
   node clock, component named by the artifact), check that each release
   artifact's layers and pack entries are blobs its signed manifest names,
   and -- for a minimal bundle -- that the request it was cut for is this
   node's own; no release for a configured component may install a
   hazardous mode the component does not allow (``protocol.manifest.check_modes``).
3. *Rollback rule*, per component: the newest release offered must be newer
   than the high-water mark (or be exactly the release held); older ones are
   imported only if already held, else skipped as history. The other
   platforms' variants of every release this node then holds are *carried*
   (protocol/fleet/variants.py, state/carried.py): stored with every blob the
   bundle brings for them, never installed, served to the LAN. A variant
   whose envelope is a patch against a release this node does not hold is
   skipped with a note; only a missing base of its own variant refuses.
4. *Layout.* Every referenced blob must be a regular file of its declared
   size; an unreferenced blob or a stray name in ``blobs/sha256`` is refused.
   Any failure so far raises before a single byte is written.
5. *Copy* the blobs the store lacks into the spool (``store/spool.py``: small
   ones appended to a pack, large ones to files), hashing each on one of
   ``COPY_THREADS`` threads; what an interrupted run left is re-checked and
   reused. Blobs the bundle carries in packs come first: each bundle pack is
   read again (one in memory at a time) and its entries are copied out of it.
   A mismatch discards what this run copied (exit 3, nothing changed); an I/O
   error keeps it for the rerun (exit 1).
6. *Commit*: flush, make the blobs part of the store, then persist the new
   root and the release envelopes and raise the high-water marks (atomic
   writes). A crash in between is repaired by a rerun: blobs already stored
   are skipped.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from p2pupd.daemon.bundles.reader import Medium
from p2pupd.daemon.bundles.sealedreader import open_bundle
from p2pupd.daemon.bundles.siterequest import node_public_key
from p2pupd.daemon.bundles.verify import (
    BundleMetadata,
    HeldEnvelopes,
    PackedBlob,
    VerifiedRelease,
    read_metadata,
)
from p2pupd.daemon.errors import BundleError, MissingBaseError
from p2pupd.daemon.fsutil import buffer_fd, ensure_free
from p2pupd.daemon.state import carried, components
from p2pupd.daemon.state.gate import needed_for, persist_release
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.store.packfile import PACKED_MAX_BYTES
from p2pupd.daemon.store.spool import Spool
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids, limits
from p2pupd.protocol.errors import (
    P2pupdError,
    RemoteProtocolError,
    RollbackError,
    VerificationError,
)
from p2pupd.protocol.manifest import Manifest, check_modes
from p2pupd.protocol.trust import Envelope, check_serial

FREE_MARGIN_BYTES = 16 * limits.MiB
COPY_THREADS = min(4, os.cpu_count() or 1)
# Small blobs are copied in runs: read one after another, then hash-checked and
# appended to a pack with one write (Spool.copy_batch).
BATCH_BLOBS = 16
BATCH_BYTES = 512 * limits.KiB
DEBRIS_ENTRIES = 1024  # hidden names (.DS_Store, ._*) tolerated in blobs/sha256

# Fault injection for the resume test: SIGKILL this process after N blobs.
_KILL_AFTER = os.environ.get("P2PUPD_IMPORT_KILL_AFTER")


class ImportInterruptedError(BundleError):
    """The import was asked to stop; complete blobs are kept for a rerun."""


@dataclass
class ImportedRelease:
    component: str
    version: str
    serial: int
    new: bool
    complete: bool = True


@dataclass
class ImportReport:
    root_version: int = 0
    releases: list[ImportedRelease] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    blobs_copied: int = 0
    blobs_resumed: int = 0
    blobs_present: int = 0
    bytes_copied: int = 0
    for_node: str | None = None
    seconds: float = 0.0
    # Newer releases with no variant for this node: (component, serial, version, message).
    no_variant: list[tuple[str, int, str, str]] = field(default_factory=list)
    # Other platforms' variants carried for the LAN: (component, version, serial, platform).
    carried: list[tuple[str, str, int, str]] = field(default_factory=list)


@dataclass
class _Candidate:
    rel: VerifiedRelease
    new: bool


def select_releases(
    node: Node, meta: BundleMetadata, report: ImportReport
) -> tuple[list[_Candidate], list[VerifiedRelease]]:
    """Apply the configuration and the rollback rule; return (what to import, the
    other platforms' variants to carry).

    Raises ``RollbackError`` when a component's newest offered release is not
    newer than the node's high-water mark (a replayed, frozen or stale
    bundle), or when a release differs from the one held under its serial.
    """
    states = node.state.read_states()
    by_comp: dict[str, list[VerifiedRelease]] = {}
    others: dict[tuple[str, int], list[VerifiedRelease]] = {}  # variants for other platforms
    for r in meta.releases:
        man = r.manifest
        if man.component not in node.config.components:
            report.skipped.append(f"{man.component} {man.version}: not configured on this node")
        elif man.platform is not None and man.platform != node.config.platform_of(man.component):
            others.setdefault((man.component, man.serial), []).append(r)
        else:
            by_comp.setdefault(man.component, []).append(r)
    out: list[_Candidate] = []
    for comp, rels in sorted(by_comp.items()):
        rels.sort(key=lambda r: r.manifest.serial)
        st = states.get(comp)
        high = st.high_water if st else 0
        newest = rels[-1]
        check_serial(newest.manifest, high, st.high_digest if st else None, newest.digest)
        for r in rels:
            man = r.manifest
            if man.serial > high:
                out.append(_Candidate(r, True))
                continue
            held = _held_digest(node, comp, man.serial)
            if held == r.digest:
                out.append(_Candidate(r, False))
            elif held is not None:
                raise RollbackError(
                    f"release {comp} serial {man.serial} differs from the one this node holds "
                    "(not newer than what it trusts)"
                )
            else:
                report.skipped.append(
                    f"{comp} {man.version}: serial {man.serial} is older than trusted serial {high}"
                )
    # Another platform's variant of a release this node holds (or takes now) is
    # carried for the LAN; a release with no variant for us is worth saying so,
    # naming what it does have.
    taken = {(c.rel.manifest.component, c.rel.manifest.serial) for c in out}
    rules = carried.rules_of(node)
    carry: list[VerifiedRelease] = []
    for key, rels in sorted(others.items()):
        if key in taken or node.releases.has(*key):
            rels.sort(key=lambda r: str(r.manifest.platform))
            carry += rels[: rules.max_carried]
            continue
        mans = [r.manifest for r in rels]
        msg = no_variant_message(mans, node.config.platform_of(key[0]))
        report.skipped.append(msg)
        st = states.get(key[0])
        if key[1] > (st.high_water if st else 0):
            report.no_variant.append((*key, mans[0].version, msg))
    return out, carry


def no_variant_message(variants: list[Manifest], platform: str) -> str:
    """Return "no variant of app 2.0 for P; the release has X, Y" for one release."""
    man = variants[0]
    have = ", ".join(sorted({str(m.platform) for m in variants}))
    return f"no variant of {man.component} {man.version} for {platform}; the release has {have}"


def _held_digest(node: Node, component: str, serial: int) -> bytes | None:
    if not node.releases.has(component, serial):
        return None
    try:
        data = node.releases.get_bytes(component, serial)
        return Envelope.decode(data, limits.MAX_MANIFEST_BYTES).payload_digest()
    except P2pupdError:  # unreadable or damaged: treated as not held
        return None


def held_envelopes(node: Node) -> HeldEnvelopes:
    """Find the stored envelope a release patch applies to, by its sha256.

    Stored envelopes are ``Envelope.encode()`` of what the node verified, so
    they are byte-identical to the publisher's. The serial the patch names is
    tried first (it is only a hint), then every other stored release of the
    component, newest first, one file in memory at a time.
    """

    def find(component: str, patch: oci.ReleasePatch) -> bytes | None:
        if component not in node.config.components:
            return None
        serials = node.releases.serials(component)
        if patch.base_serial in serials:
            serials.remove(patch.base_serial)
            serials.append(patch.base_serial)
        reads: list[Callable[[], bytes]] = [
            partial(node.releases.get_bytes, component, s) for s in reversed(serials)
        ]
        # A variant carried for another platform is the base of that platform's next one.
        reads += [
            partial(node.carried.get_bytes, component, s, p)
            for s, p in reversed(node.carried.carried(component))
        ]
        for read in reads:
            try:
                data = read()
            except P2pupdError:  # unreadable: not a base
                continue
            if ids.sha256(data) == patch.base:
                return data
        return None

    return find


def import_bundle(
    node: Node,
    src: os.PathLike[str] | str,
    now: int | None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    *,
    cancel: Callable[[], bool] | None = None,
    allow_other_node: bool = False,
) -> ImportReport:
    """Verify and import the bundle at ``src`` into ``node``. See module doc.

    The caller holds the node lock. ``on_total`` is told how many bytes will
    be copied, ``progress`` each block copied; ``cancel`` is polled between
    blobs. Raises a ``VerificationError`` (refused) or ``RemoteProtocolError``
    (malformed medium) with the node unchanged; ``BundleError`` (the medium
    could not be read), ``ImportInterruptedError`` or ``StorageError`` with the
    node unchanged but for complete blobs kept in the spool to resume.
    """
    t0 = time.monotonic()
    keys = partial(node.membership.seal_keys, node.config.node_id)
    with open_bundle(src, keys, node.root) as reader:
        meta = read_metadata(
            reader, node.trusted_root(), node.trust_store.history(), now, held_envelopes(node)
        )
        report = ImportReport(root_version=meta.trusted.version)
        if meta.request is not None:
            report.for_node = meta.request.collector.node_id.hex()
            if not allow_other_node:
                cfg = node.config
                meta.check_request_is_for(
                    cfg.node_id, node_public_key(node.state), cfg.former_node_ids
                )
        for u in meta.unresolved:
            if u.component not in node.config.components:
                report.skipped.append(f"{u.label}: not configured on this node")
            elif u.platform not in (None, node.config.platform_of(u.component)):
                report.skipped.append(  # a neighbour's variant: not carried this time
                    f"{u.label} for {u.platform}: not carried, its manifest is a patch against "
                    "a release this node does not hold"
                )
            else:
                raise MissingBaseError(u.message)
        todo, carry = select_releases(node, meta, report)
        for c in todo:  # before any blob is copied: a refused mode changes nothing
            man = c.rel.manifest
            check_modes(man, node.config.components[man.component].allow_hazardous_modes)
        # An honest blob directory holds exactly the referenced blobs (and a
        # little OS debris), which bounds the listing far below MAX_BUNDLE_MEMBERS.
        inodes = reader.check_blobs(meta.referenced, len(meta.referenced) + DEBRIS_ENTRIES)
        brought: dict[bytes, int] = {}
        for rel in [c.rel for c in todo] + carry:
            brought.update(rel.carried)
        need = {d: s for d, s in brought.items() if not node.store.has(d)}
        report.blobs_present = len(brought) - len(need)
        spool = Spool(node.root, node.store)
        done = False
        try:
            blobs = _BlobOpener(reader, meta.packed)
            _copy(blobs, spool, need, inodes, report, progress, on_total, cancel)
            # Everything is verified and on our disk. From here on only complete
            # blobs and atomically written documents are added.
            spool.commit()
            done = True
        finally:
            spool.close(clear=done)
    _persist(node, meta, todo, carry, report, now, os.fspath(src))
    report.seconds = time.monotonic() - t0
    return report


class _BlobOpener:
    """Opens the bytes of a blob to copy: its file on the medium, or its entry in a pack.

    ``Spool.copy`` reads from an fd, so a packed blob is served from an
    anonymous in-memory file. The pack is read (hash-checked) again, one at a
    time: packed blobs are copied in pack order, so each pack is read about once.
    """

    def __init__(self, reader: Medium, packed: dict[bytes, PackedBlob]) -> None:
        self.reader = reader
        self.packed = packed
        self._lock = threading.Lock()
        self._pack: tuple[bytes, bytes] | None = None  # (digest, bytes) of the pack in memory

    def order(self, digest: bytes, inodes: dict[bytes, int]) -> tuple[int, bytes, int]:
        """Sort key: packed blobs first, by pack and offset; then files in on-disk order."""
        at = self.packed.get(digest)
        if at is not None:
            return (0, at.pack, at.offset)
        return (1, b"", inodes.get(digest, 0))

    def open(self, digest: bytes, size: int) -> int:
        """Return an fd reading the blob from its start (the caller closes it)."""
        at = self.packed.get(digest)
        if at is None:
            return self.reader.open_blob(digest, size)
        with self._lock:
            if self._pack is None or self._pack[0] != at.pack:
                self._pack = None  # one pack in memory at a time
                self._pack = (at.pack, self.reader.read_blob(at.pack, at.pack_size))
            data = self._pack[1][at.offset : at.offset + at.size]
        return buffer_fd(data, "packed blob")


def _copy(
    blobs: _BlobOpener,
    spool: Spool,
    need: dict[bytes, int],
    inodes: dict[bytes, int],
    report: ImportReport,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    cancel: Callable[[], bool] | None,
) -> None:
    """Bring every blob of ``need`` into the spool; see step 5 of the module doc.

    Blobs are copied by ``COPY_THREADS`` threads (hashing and the kernel's
    reads and writes release the GIL): packed blobs first, then files in
    on-disk order of the medium; small ones in runs (``BATCH_BLOBS``,
    ``BATCH_BYTES``) that go into the spool's pack with one write, so the
    threads meet at the pack once per run instead of twice per blob.
    """
    resumed = spool.resume(need)
    todo = iter(sorted((d for d in need if d not in resumed), key=lambda d: blobs.order(d, inodes)))
    total = sum(s for d, s in need.items() if d not in resumed)
    if on_total is not None:
        on_total(total)
    if total:
        ensure_free(spool.dir.parent, total, FREE_MARGIN_BYTES)
    report.blobs_resumed = len(resumed)
    lock = threading.Lock()
    pending: list[bytes] = []  # a large blob that ended a run of small ones
    copied: list[bytes] = []
    failed: list[BaseException] = []
    kill_after = int(_KILL_AFTER) if _KILL_AFTER else None
    limit = 1 if kill_after is not None else BATCH_BLOBS  # the kill lands after blob N exactly

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    def take(most: int) -> list[bytes]:
        """The next blob, or a run of up to ``most`` small ones (and ``BATCH_BYTES``)."""
        batch: list[bytes] = []
        size = 0
        with lock:
            while not failed and len(batch) < most and size < BATCH_BYTES:
                dg = pending.pop() if pending else next(todo, None)
                if dg is None:
                    break
                if need[dg] > PACKED_MAX_BYTES:
                    if batch:  # a large one is copied on its own, next time
                        pending.append(dg)
                        break
                    return [dg]
                batch.append(dg)
                size += need[dg]
        return batch

    def worker() -> None:
        # Runs start at one blob and double: the first bytes show as progress
        # at once, and a stop or a failing medium is met within a blob or two.
        most = 1
        while batch := take(most):
            most = min(2 * most, limit)
            try:
                if cancel is not None and cancel():
                    raise ImportInterruptedError(
                        f"import stopped after {len(copied)} blobs; rerun it to resume"
                    )
                fds: list[int] = []
                try:
                    for dg in batch:
                        fds.append(blobs.open(dg, need[dg]))
                    if len(batch) == 1 and need[batch[0]] > PACKED_MAX_BYTES:
                        n = spool.copy(fds[0], batch[0], need[batch[0]], advance)
                    else:
                        sources = [(fd, dg, need[dg]) for fd, dg in zip(fds, batch, strict=True)]
                        n = spool.copy_batch(sources, advance)
                finally:
                    for fd in fds:
                        os.close(fd)
            except BaseException as exc:
                with lock:
                    failed.append(exc)
                return
            with lock:
                copied.extend(batch)
                report.blobs_copied += len(batch)
                report.bytes_copied += n
                if kill_after is not None and len(copied) >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

    threads = [threading.Thread(target=worker, name=f"import-{i}") for i in range(COPY_THREADS)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as exc:  # KeyboardInterrupt: stop after the blobs in flight
        with lock:
            failed.insert(0, exc)
        for t in threads:
            t.join()
    if failed:
        if isinstance(failed[0], (VerificationError, RemoteProtocolError)):
            # The bundle lied: what it brought goes, so a refusal changes nothing.
            spool.discard()
        raise failed[0]


def _persist(
    node: Node,
    meta: BundleMetadata,
    todo: list[_Candidate],
    carry: list[VerifiedRelease],
    report: ImportReport,
    now: int | None,
    src: str,
) -> None:
    """Record the new root, the releases and the high-water marks (step 6), then the
    variants carried for other platforms.

    Releases take the one path every verified release takes into a node
    (``gate.persist_release``).
    """
    if meta.trusted.version != node.trusted_root().version:
        node.trust_store.advance(meta.roots, now)
    for comp, serial, version, msg in report.no_variant:
        # Recorded once, so `apply` can say why a release the site expects is absent.
        components.no_variant(node, comp, serial, version, msg)
    for c in todo:
        man = c.rel.manifest
        if c.new:
            persist_release(node, man, c.rel.envelope, c.rel.digest, "imported", src)
        complete = not needed_for(node, man)
        report.releases.append(
            ImportedRelease(man.component, man.version, man.serial, c.new, complete)
        )
    for rel in carry:
        man = rel.manifest
        assert man.platform is not None
        carried.persist_carried(node, man, rel.envelope)
        report.carried.append((man.component, man.version, man.serial, man.platform))
