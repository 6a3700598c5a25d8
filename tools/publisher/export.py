"""Bundle export: write releases and their blobs as an OCI image layout.

A full bundle holds the whole root chain (so a node pinned to any older root can
walk forward), the newest release of each chosen component, and the blobs those
releases need. A *minimal* bundle, cut for a site's request file, holds only
the roots, releases and blobs that site lacks (``plan_for_request``) plus the
request itself, so the site can tell the bundle was made for it.

Writing is crash-safe and re-uses a stick: an old ``index.json`` is removed
first, blobs go in (those already present are kept), blobs no longer referenced
are deleted, and ``index.json`` is written last, each file with temp + fsync +
rename. A stick pulled out mid-export therefore holds no index (refused as
incomplete) or a complete bundle -- never a stale index naming missing blobs.

A release whose receiving node is known to hold an earlier release of the same
component (``export --from-version``, ``--for``) carries its signed envelope as
a patch against the envelope that node holds -- bsdiff4 or zstd with the held
envelope as dictionary, whichever is smaller -- when that is smaller than the
envelope: on a tree of many small files the envelope, not the data, is most of
the bundle. Such a node also trusts the root its held release was signed
under, so roots up to that version are left out (``receiver_root``); a full
export carries the whole chain.

Blobs of at most ``bundle.PACK_BLOB_MAX_BYTES`` (deltas, zstd literals, small
files and tail chunks) go into packs, one or more per release, instead of a
file and a descriptor each; a blob two releases of the bundle share stays a
file, so every artifact lists what it carries and no bytes are written twice.
At most ``PACKED_BYTES_PER_BUNDLE`` are packed: an importer reads packs twice.

Sources are a publisher's repository (``RepoSource``) or a node's state
directory (``api.open_state_source``): anything with the ``ExportSource`` shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Protocol

from p2pupd.daemon.api import BlobStore, NotFoundError, atomic_write
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.deltaplan import needed_blobs
from p2pupd.protocol.errors import HashMismatchError, MixAndMatchError, P2pupdError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.patchcodec import encode_dict_patch, encode_patch
from p2pupd.protocol.request import Request, plan_for_request
from p2pupd.protocol.site import sealed
from p2pupd.protocol.trust import Envelope, Root, TrustedRoot
from p2pupd.tools.publisher.repo import Repo, RepoError
from p2pupd.tools.publisher.sealexport import SealingStore

PACKED_BYTES_PER_BUNDLE = 64 * limits.MiB


@dataclass
class ExportReport:
    releases: list[tuple[str, str, int]] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    blobs_in_bundle: int = 0
    bytes_in_bundle: int = 0
    envelope_bytes: int = 0  # release envelopes (or their patches) in the bundle
    envelopes_patched: int = 0
    blobs_packed: int = 0  # of blobs_in_bundle, those carried in packs
    roots_left_out: int = 0  # roots the receiving node already trusts
    notes: list[str] = field(default_factory=list)
    for_node: str | None = None
    format: str = ""  # the bundle format written (protocol/bundle.py: the oldest that fits)


@dataclass(frozen=True)
class HeldEnvelope:
    """A release the receiving node holds: its envelope is stored there as
    ``envelope.encode()`` (canonical msgpack), byte for byte."""

    serial: int
    version: str
    envelope: Envelope


@dataclass(frozen=True)
class ReleaseSource:
    """One release to export: its envelope, manifest, and which blobs to carry.

    ``base``, when set, is a release of the same component the receiving node
    holds: the envelope is then carried as a patch against it if smaller.
    """

    manifest: Manifest
    envelope: Envelope
    blobs: dict[bytes, int]
    base: HeldEnvelope | None = None


def envelope_layer(rel: ReleaseSource) -> tuple[bytes, str, dict[str, str]]:
    """Return (bytes, media type, annotations) of ``rel``'s first layer.

    The whole envelope, or the smaller of a bsdiff4 patch and a zstd frame
    with the envelope of ``rel.base`` as dictionary, when that is smaller
    (``oci.RELEASE_PATCH_MEDIA_TYPES``, annotated with both envelopes' sha256
    and the result's size). The patch saves bytes only: the node verifies the
    envelope it rebuilds exactly as a whole one.
    """
    data = rel.envelope.encode()
    if rel.base is None:
        return data, oci.RELEASE_MEDIA_TYPE, {}
    base = rel.base.envelope.encode()
    if base == data:
        return data, oci.RELEASE_MEDIA_TYPE, {}
    patch, media_type = min(
        # Format 1 (every node applies it): a bundle is written in the oldest
        # format that carries it, and an envelope patch is a few hundred bytes.
        (encode_patch(base, data, patch_format=1), oci.RELEASE_PATCH_MEDIA_TYPE),
        (encode_dict_patch(base, data), oci.RELEASE_ZPATCH_MEDIA_TYPE),
        key=lambda c: len(c[0]),
    )
    if len(patch) >= len(data):
        return data, oci.RELEASE_MEDIA_TYPE, {}
    rp = oci.ReleasePatch(
        ids.sha256(base), ids.sha256(data), len(data), rel.base.serial, rel.base.version
    )
    return patch, media_type, rp.annotations()


def receiver_root(roots: dict[int, bytes], releases: Iterable[ReleaseSource]) -> int:
    """Return the root version the receiving node is known to trust at least (0: unknown).

    A node holding the release ``rel.base`` verified it under the root it
    trusted then, and a node's root only moves forward: so it trusts at least
    the lowest root among ``roots`` whose release keys sign that envelope.
    The roots up to that version need not travel.
    """
    known = 0
    loaded: dict[int, TrustedRoot | None] = {}
    for rel in releases:
        if rel.base is None:
            continue
        data = rel.base.envelope.encode()
        for v in sorted(roots):
            if v not in loaded:
                try:
                    loaded[v] = TrustedRoot.load(roots[v], None)
                except P2pupdError:  # not a usable root: it proves nothing
                    loaded[v] = None
            root = loaded[v]
            try:
                if root is not None and root.verify_release(data, None):
                    known = max(known, v)
                    break
            except P2pupdError:
                continue
    return known


class BlobSource(Protocol):
    def open(self, digest: bytes) -> BinaryIO: ...


class ExportSource(BlobSource, Protocol):
    """Where releases come from: a repository or a node's state directory."""

    @property
    def repository(self) -> str: ...

    def roots(self) -> dict[int, bytes]: ...

    def components(self) -> list[str]: ...

    def serials(self, component: str) -> list[int]: ...

    def release(self, component: str, serial: int) -> tuple[Manifest, Envelope] | None: ...

    def has_blob(self, digest: bytes) -> bool: ...


class RepoSource:
    """A publisher's repository as an ``ExportSource`` (releases re-verified).

    A release with platform variants is seen through ``platform``: its
    variant for that platform, or none (``None`` sees universal releases only).
    """

    def __init__(self, repo: Repo, platform: str | None = None) -> None:
        self.repo = repo
        self.platform = platform
        self.trusted = repo.trusted()
        self.store = repo.store

    @property
    def repository(self) -> str:
        return self.trusted.root.name

    def roots(self) -> dict[int, bytes]:
        return self.repo.roots()

    def components(self) -> list[str]:
        return self.repo.components()

    def serials(self, component: str) -> list[int]:
        return self.repo.serials(component)

    def release(self, component: str, serial: int) -> tuple[Manifest, Envelope] | None:
        held = self.repo.platforms(component, serial)
        platform = None if None in held else self.platform
        if platform not in held:
            return None
        return self.repo.release(component, serial, platform)

    def has_blob(self, digest: bytes) -> bool:
        return self.store.has(digest)

    def open(self, digest: bytes) -> BinaryIO:
        return self.store.open(digest)


def full_releases(
    source: ExportSource, components: Iterable[str], history: int, notes: list[str]
) -> list[ReleaseSource]:
    """Return the newest ``history`` releases of each component the source can supply whole.

    Each carries its chunks and hooks (no patches: the receiving node's
    versions are unknown). A newer release missing blobs here is skipped with
    a note; raises ``RepoError`` for a component with no usable release.
    """
    out: list[ReleaseSource] = []
    for comp in components:
        picked: list[ReleaseSource] = []
        for serial in sorted(source.serials(comp), reverse=True):
            found = source.release(comp, serial)
            if found is None:
                continue
            man, env = found
            blobs = needed_blobs(replace(man, deltas=()), [], lambda _d: False)
            if not all(source.has_blob(d) for d in blobs):
                notes.append(f"{comp} {man.version}: not complete here, not exported")
                continue
            picked.append(ReleaseSource(man, env, blobs))
            if len(picked) >= max(1, history):
                break
        if not picked:
            raise RepoError(f"component {comp!r} has no complete release to export")
        out.extend(reversed(picked))
    return out


def writer() -> str:
    """``p2pupd VERSION`` of this code, for the bundle's informative writer annotation."""
    try:
        return f"p2pupd {metadata.version('p2pupd')}"
    except metadata.PackageNotFoundError:
        return "p2pupd (source tree)"


def write_bundle(
    dest: Path,
    roots: dict[int, bytes],
    releases: Iterable[ReleaseSource],
    source: BlobSource,
    progress: Callable[[int], None] | None = None,
    *,
    request: bytes | None = None,
    seal_to: list[bytes] | None = None,
) -> ExportReport:
    """Write a bundle into ``dest`` (created if needed). See module doc.

    ``request``, the signed request file a minimal bundle was cut for, is
    carried as a request artifact. ``seal_to`` (site seal keys) writes a
    sealed bundle only members of those sites can read (sealexport.py). Raises ``RepoError``/``NotFoundError`` for
    a blob the source lacks, ``HashMismatchError`` for one whose bytes do not
    match, ``StorageError`` for write errors.
    """
    releases = list(releases)
    report = ExportReport()
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (dest / "index.json").unlink()  # a stale index must never outlive its blobs
    out: BlobStore | SealingStore = (
        BlobStore(dest) if not seal_to else SealingStore(dest, seal_to, writer())
    )
    index: list[oci.Descriptor] = []
    artifacts: list[oci.Artifact] = []
    keep: set[bytes] = set()

    def put_doc(data: bytes, media_type: str, ann: dict[str, str] | None = None) -> oci.Descriptor:
        dg = out.put_bytes(data)
        keep.add(dg)
        return oci.Descriptor(media_type, dg, len(data), ann or {})

    def put_artifact(art: oci.Artifact, ann: dict[str, str]) -> None:
        d = put_doc(oci.build_artifact(art), oci.MANIFEST_MEDIA_TYPE, ann)
        index.append(d)
        artifacts.append(art)

    put_doc(oci.EMPTY_JSON, oci.EMPTY_MEDIA_TYPE)
    held = receiver_root(roots, releases)
    report.roots_left_out = sum(v <= held for v in roots)
    roots = {v: d for v, d in roots.items() if v > held}
    if roots:
        layers = []
        for v in sorted(roots):
            env = Envelope.decode(roots[v], limits.MAX_ROOT_BYTES)
            Root.from_value(encoding.decode(env.payload, limits.MAX_ROOT_BYTES))
            layers.append(
                put_doc(roots[v], oci.ROOT_MEDIA_TYPE, {oci.ANNOTATION_ROOT_VERSION: str(v)})
            )
        put_artifact(
            oci.Artifact(oci.TRUST_ARTIFACT, tuple(layers), {}), {oci.ANNOTATION_REF_NAME: "trust"}
        )
    if request is not None:
        layer = put_doc(request, oci.REQUEST_MEDIA_TYPE)
        put_artifact(
            oci.Artifact(oci.REQUEST_ARTIFACT, (layer,), {}), {oci.ANNOTATION_REF_NAME: "request"}
        )

    uses: dict[bytes, int] = {}
    for rel in releases:
        for dg in rel.blobs:
            uses[dg] = uses.get(dg, 0) + 1
    pack_budget = PACKED_BYTES_PER_BUNDLE
    for rel in releases:
        man = rel.manifest
        first, media_type, first_ann = envelope_layer(rel)
        layers = [put_doc(first, media_type, first_ann)]
        report.envelope_bytes += len(first)
        report.envelopes_patched += media_type in oci.RELEASE_PATCH_MEDIA_TYPES
        small: dict[bytes, int] = {}
        for dg, size in sorted(rel.blobs.items()):
            if size <= oci.PACK_BLOB_MAX_BYTES and uses[dg] == 1 and size <= pack_budget:
                small[dg] = size
                pack_budget -= size
        for pack in _pack_groups(small):
            data = _pack(pack, source, man, progress)
            present = out.has(ids.sha256(data))
            layers.append(put_doc(data, oci.PACK_MEDIA_TYPE))
            if not present:
                report.blobs += len(pack)
                report.bytes += sum(pack.values())
            report.blobs_in_bundle += len(pack)
            report.bytes_in_bundle += sum(pack.values())
            report.blobs_packed += len(pack)
        types = oci.layer_media_types(man)
        for dg, size in sorted(rel.blobs.items()):
            if dg in small:
                continue
            keep.add(dg)
            if not out.has(dg):
                try:
                    with source.open(dg) as f:
                        n = out.put_stream(f, dg, size, progress)
                except NotFoundError:
                    raise RepoError(
                        f"blob {ids.hexd(dg)[:16]} of {man.component} {man.version} is missing"
                    ) from None
                report.blobs += 1
                report.bytes += n
            layers.append(oci.Descriptor(types.get(dg, oci.CHUNK_MEDIA_TYPE), dg, size, {}))
            report.blobs_in_bundle += 1
            report.bytes_in_bundle += size
        ann = {
            oci.ANNOTATION_COMPONENT: man.component,
            oci.ANNOTATION_VERSION: man.version,
            oci.ANNOTATION_SERIAL: str(man.serial),
        }
        ref = f"{man.component}-{man.serial}"
        if man.platform is not None:  # variants of one release need distinct names
            ann[oci.ANNOTATION_PLATFORM] = man.platform
            ref += f"-{man.platform}"
        put_artifact(
            oci.Artifact(oci.RELEASE_ARTIFACT, tuple(layers), ann),
            {**ann, oci.ANNOTATION_REF_NAME: ref},
        )
        report.releases.append((man.component, man.version, man.serial))

    # The oldest format that carries this content, not the newest we know:
    # older nodes import what needs nothing new (protocol/bundle.py).
    fmt = oci.format_needed(artifacts)
    plain = oci.build_index(index, fmt, writer())
    if isinstance(out, SealingStore):
        top = out.finish(plain, keep)  # the sealed stick's own format, around this one
        fmt = max(fmt, sealed.BUNDLE_FORMAT)
    else:
        out.gc(keep)  # blobs of an earlier bundle in the same place: importers refuse extras
        top = plain
    report.format = oci.format_text(fmt)
    out.clean_tmp()
    with contextlib.suppress(OSError):
        (dest / "tmp").rmdir()  # the writer's scratch dir is not part of the layout
    atomic_write(dest / "oci-layout", oci.OCI_LAYOUT)
    atomic_write(dest / "index.json", top)
    return report


def _pack_groups(blobs: dict[bytes, int]) -> list[dict[bytes, int]]:
    """Split ``blobs`` (digest -> size) into groups that each fit one pack."""
    groups: list[dict[bytes, int]] = []
    cur: dict[bytes, int] = {}
    used = oci.PACK_HEADER_MAX_BYTES
    for dg, size in blobs.items():
        n = oci.packed_bytes(size)
        if cur and (len(cur) >= oci.MAX_PACK_ENTRIES or used + n > oci.MAX_PACK_BYTES):
            groups.append(cur)
            cur, used = {}, oci.PACK_HEADER_MAX_BYTES
        cur[dg] = size
        used += n
    if cur:
        groups.append(cur)
    return groups


def _pack(
    blobs: dict[bytes, int],
    source: BlobSource,
    man: Manifest,
    progress: Callable[[int], None] | None,
) -> bytes:
    """Return a pack of ``blobs`` read from ``source``, each checked against its digest."""
    parts = []
    for dg, size in blobs.items():
        try:
            with source.open(dg) as f:
                data = f.read(size + 1)
        except NotFoundError:
            raise RepoError(
                f"blob {ids.hexd(dg)[:16]} of {man.component} {man.version} is missing"
            ) from None
        except OSError as exc:
            raise RepoError(
                f"cannot read blob {ids.hexd(dg)[:16]}: {exc.strerror or exc}"
            ) from None
        if len(data) != size or ids.sha256(data) != dg:
            raise HashMismatchError(
                f"blob {ids.hexd(dg)[:16]} of {man.component} {man.version} does not match "
                "its sha256 here"
            )
        parts.append(data)
        if progress is not None:
            progress(size)
    return oci.build_pack(parts)


def releases_for_request(
    source: ExportSource, req: Request, *, use_deltas: bool = True
) -> tuple[list[ReleaseSource], dict[int, bytes], list[str]]:
    """Return (releases, roots, notes) of the smallest bundle for ``req``'s node.

    Each release's envelope may travel as a patch against one the node holds
    (``held_base``). Raises ``MixAndMatchError`` if the node trusts another repository and
    ``RepoError`` if a blob the plan needs is missing from the source.
    """
    cache: dict[tuple[str, int], tuple[Manifest, Envelope] | None] = {}

    def get(component: str, serial: int) -> tuple[Manifest, Envelope] | None:
        if (component, serial) not in cache:
            cache[component, serial] = source.release(component, serial)
        return cache[component, serial]

    def lookup(component: str, serial: int) -> tuple[Manifest, bytes] | None:
        found = get(component, serial)
        return None if found is None else (found[0], found[1].payload_digest())

    all_roots = source.roots()
    digests = {
        v: Envelope.decode(d, limits.MAX_ROOT_BYTES).payload_digest() for v, d in all_roots.items()
    }
    plan = plan_for_request(
        req, source.repository, source.serials, lookup, digests, use_deltas=use_deltas
    )
    out: list[ReleaseSource] = []
    for p in plan.releases:
        man = p.manifest
        found = get(man.component, man.serial)
        assert found is not None  # the plan only names releases lookup found
        missing = [d for d in p.blobs if not source.has_blob(d)]
        if missing:
            raise RepoError(
                f"{len(missing)} blob(s) of {man.component} {man.version} are missing here"
            )
        out.append(ReleaseSource(man, found[1], p.blobs, held_base(req, man, get)))
    return out, {v: all_roots[v] for v in plan.roots}, plan.notes


def held_base(
    req: Request,
    new: Manifest,
    get: Callable[[str, int], tuple[Manifest, Envelope] | None],
) -> HeldEnvelope | None:
    """Return the release of ``new``'s component that ``req``'s node holds and
    this source knows (same signed payload): the installed one if held, else
    the newest held. None if there is none."""
    installed = {c.name: c.installed for c in req.components}.get(new.component)
    best: tuple[bool, int] | None = None
    picked: HeldEnvelope | None = None
    for r in req.releases:
        if r.component != new.component or r.serial == new.serial:
            continue
        found = get(r.component, r.serial)
        if found is None or found[1].payload_digest() != r.digest:
            continue
        rank = (r.serial == installed, r.serial)
        if best is None or rank > best:
            best, picked = rank, HeldEnvelope(r.serial, found[0].version, found[1])
    return picked


def check_node_key(known_dir: Path, req: Request) -> bool:
    """Trust a node's key on first use; refuse a request whose key changed.

    Records ``known_dir/<node id>.pub`` the first time a node is seen (returns
    True). Raises ``MixAndMatchError`` if the node id is known under another
    key: the request is from another node, or the node was re-initialised
    (then delete that file to accept the new key).
    """
    path = known_dir / f"{req.node_id.hex()}.pub"
    try:
        known = path.read_text().strip()
    except FileNotFoundError:
        known_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (req.node_key.hex() + "\n").encode())
        return True
    except OSError as exc:
        raise RepoError(f"cannot read {path}: {exc.strerror}") from None
    if known != req.node_key.hex():
        raise MixAndMatchError(
            f"request claims node {req.node_id.hex()[:12]} but is signed by key "
            f"{req.key_id[:12]}, not the key this publisher knows for that node "
            f"(another node's request, or the node was re-initialised: then remove {path})"
        )
    return False
