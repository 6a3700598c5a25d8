"""Read and verify every signed document of a bundle, in memory, before any write.

Theory of operation. ``read_metadata`` is steps 1-2 of the importer (see
importer.py): it reads the OCI metadata and the documents it points to
through a ``BundleReader`` (bounded, hash-checked, never through a link) and
applies the trust rules to all of them. It returns only what passed; any
failure raises, and since nothing here writes, a refused bundle leaves the node
untouched. Rules, one check each:

  1. ``oci-layout``/``index.json``/artifacts parse within their budgets
     (``limits.*_JSON_BUDGET``: bytes, and JSON values counted before
     parsing) ........................................................... RemoteProtocolError
  2. a blob's bytes hash to its name and size ............................ HashMismatchError
  2b. a release envelope carried as a patch: its base is an envelope the
     node stores (found by sha256, else the release is *unresolved*, see
     below); bspatch (decompressing at most 3 x the annotated size), or
     zstd with the base as dictionary, within the annotated size; the
     result hashes to the annotated sha256 .............................. HashMismatchError
  3. all metadata read stays under ``bundle.MAX_METADATA_BYTES``, roots
     under ``MAX_BUNDLE_ROOT_BYTES`` ...................................... FrameTooLargeError
  4. a bundle root at a version the node holds is that root ............. (trust.walk)
  5. roots N+1, N+2... rotate from the pinned root ....................... (trust.walk)
  6. each release verifies under the resulting root, unexpired ........... (trust.verify_release)
  7. the artifact's component annotation matches the signed one ........ MixAndMatchError
  7b. a pack of a verified release parses within its bounds
     (``bundle.parse_pack``), lists no more entries than the manifest
     names blobs, holds no blob twice, and each entry -- named by the
     sha256 of its bytes -- is a blob the manifest names at that size ..... SchemaError
  8. a release artifact carries only blobs its manifest names, at size,
     each once -- pack entries included ................................... SchemaError
  9. one bundle does not offer two different releases under one serial
     (platform variants of a release are not two releases) ............... RollbackError
 10. a request artifact is a document signed by the node key it names .... (request.verify_any_request)

A rebuilt envelope then takes rules 6-9 exactly as a whole one: the patch
saves bytes, trust comes from the signature. A patch whose base this node does
not hold is not an error here: it is listed in ``BundleMetadata.unresolved``
and the importer refuses the bundle (``MissingBaseError``, exit 1) only if it
needs that component (its packs are then not read at all).

What an unverified input may cost is fixed before it is read: a signed
envelope is checked over its raw bytes before its payload is decoded
(``trust.Envelope.decode`` builds only the envelope's own few fields), so at
most one unverified release envelope (<= 64 MiB, or its patch and what that
rebuilds) is in memory at a time; the artifacts around it are parsed within
their JSON budgets; a pack is read only once its release verified, and its
entries are checked against that release as they are hashed.

Packs are read here, whole (each at most ``bundle.MAX_PACK_BYTES``, counted
against rule 3), only to learn which blobs they hold; their bytes are dropped
again and ``BundleMetadata.packed`` says where each entry lies. The importer
reads a pack a second time to copy the entries it needs, and hashes each entry
again as it copies it, so a medium that changes in between is caught.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

from p2pupd.daemon.bundles.reader import Medium
from p2pupd.daemon.stage.delta import apply_patch
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import (
    FrameTooLargeError,
    HashMismatchError,
    MixAndMatchError,
    RollbackError,
    SchemaError,
)
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.request import SiteRequest, check_site_includes, verify_any_request
from p2pupd.protocol.trust import Envelope, Root, TrustedRoot

# (component, patch) -> the stored envelope whose sha256 is ``patch.base``, or None.
HeldEnvelopes = Callable[[str, oci.ReleasePatch], bytes | None]


@dataclass(frozen=True)
class UnresolvedRelease:
    """A release carried as a patch against an envelope this node does not hold."""

    component: str  # from the (unsigned) artifact annotations
    label: str  # "app 2.0", printable
    message: str
    platform: str | None = None  # the variant's, from the annotations too (None: universal)


@dataclass(frozen=True)
class PackedBlob:
    """Where a blob lies in a pack of the bundle."""

    pack: bytes  # the pack's digest
    pack_size: int
    offset: int
    size: int


@dataclass(frozen=True)
class VerifiedRelease:
    manifest: Manifest
    envelope: Envelope
    digest: bytes  # of the signed payload: the release's identity
    carried: dict[bytes, int]  # blobs the bundle carries for it


@dataclass
class BundleMetadata:
    trusted: TrustedRoot  # the root after every rotation the bundle offers
    roots: dict[int, bytes]
    releases: list[VerifiedRelease] = field(default_factory=list)
    request: SiteRequest | None = None  # the (site) request the bundle was cut for
    referenced: dict[bytes, int] = field(default_factory=dict)  # every blob named, by size
    unresolved: list[UnresolvedRelease] = field(default_factory=list)
    packed: dict[bytes, PackedBlob] = field(default_factory=dict)  # blobs carried in packs

    def check_request_is_for(
        self, node_id: bytes, node_key: bytes | None, former_ids: tuple[bytes, ...] = ()
    ) -> None:
        """Raise ``MixAndMatchError`` if the bundle was cut for a request this node is not in.

        ``former_ids``: ids the node had before it was derived from its key;
        a request made under one of them (with the same key) is still its own.
        """
        if self.request is None:
            return
        for old in former_ids:
            try:
                check_site_includes(self.request, old, node_key)
                return
            except MixAndMatchError:
                pass
        check_site_includes(self.request, node_id, node_key)


class _Reads:
    """Reads metadata blobs, recording references and the bytes spent (rules 2, 3)."""

    def __init__(self, reader: Medium) -> None:
        self.reader = reader
        self.referenced: dict[bytes, int] = {}
        self.spent = 0
        self.charged: set[bytes] = set()  # blobs already counted against rule 3
        self.root_bytes = 0
        self.packs: dict[bytes, list[oci.PackEntry]] = {}  # by the pack's digest
        self.packed: dict[bytes, PackedBlob] = {}
        self.entries = 0

    def ref(self, d: oci.Descriptor) -> None:
        if self.referenced.setdefault(d.digest, d.size) != d.size:
            raise SchemaError(f"bundle names blob {d.digest.hex()[:16]} with two sizes")

    def read(self, d: oci.Descriptor, limit: int, what: str) -> bytes:
        if d.size > limit:
            raise FrameTooLargeError(f"bundle {what} of {d.size} bytes exceeds limit {limit}")
        if d.digest not in self.charged:
            self.charge(d.size)
            self.charged.add(d.digest)
        return self.reader.read_blob(d.digest, d.size)

    def artifact(self, d: oci.Descriptor) -> oci.Artifact:
        """Read and parse an artifact manifest within ``limits.ARTIFACT_JSON_BUDGET``.

        A large one is first scanned a block at a time for its value bound,
        so a JSON bomb is refused having cost one block of memory, not its size.
        """
        budget = limits.ARTIFACT_JSON_BUDGET
        if d.size > budget.max_bytes:
            raise FrameTooLargeError(
                f"bundle {budget.name} of {d.size} bytes exceeds limit {budget.max_bytes}"
            )
        if d.size > SCAN_FIRST_BYTES:
            bound, allowed = 1, budget.values_allowed(d.size)
            for block in self.reader.scan_blob(d.digest, d.size):
                bound += oci.json_values_bound(block) - 1
                if bound > allowed:
                    raise FrameTooLargeError(
                        f"bundle {budget.name} {d.digest.hex()[:16]} of {d.size} bytes holds "
                        f"more than {allowed} JSON values (its limit)"
                    )
        return oci.parse_artifact(self.read(d, budget.max_bytes, "artifact"))

    def root(self, d: oci.Descriptor) -> bytes:
        data = self.read(d, limits.MAX_ROOT_BYTES, "root")
        self.root_bytes += len(data)
        if self.root_bytes > MAX_BUNDLE_ROOT_BYTES:
            raise FrameTooLargeError(
                f"bundle roots exceed {MAX_BUNDLE_ROOT_BYTES // limits.MiB} MiB together"
            )
        return data

    def pack(self, d: oci.Descriptor, named: dict[bytes, int]) -> None:
        """Read a pack of a *verified* release and learn its entries (rule 2c);
        its bytes are dropped. Every entry must be a blob of ``named`` (the
        release's signed blob sizes), checked as it is hashed."""
        if d.digest in self.packs:
            return
        data = self.read(d, oci.MAX_PACK_BYTES, "pack")
        try:
            entries = oci.pack_entries(data, named)
        except SchemaError as exc:
            raise SchemaError(f"bundle pack {d.digest.hex()[:16]}: {exc}") from None
        self.entries += len(entries)
        if self.entries > limits.MAX_BUNDLE_MEMBERS:
            raise SchemaError(f"bundle packs hold over {limits.MAX_BUNDLE_MEMBERS} blobs")
        self.packs[d.digest] = entries
        for e in entries:
            self.packed.setdefault(e.digest, PackedBlob(d.digest, d.size, e.offset, e.size))

    def charge(self, n: int) -> None:
        """Count ``n`` bytes read or built in memory against rule 3."""
        self.spent += n
        if self.spent > oci.MAX_METADATA_BYTES:
            raise FrameTooLargeError(
                f"bundle metadata exceeds {oci.MAX_METADATA_BYTES // limits.MiB} MiB"
            )


# Artifacts larger than this are scanned for their JSON value bound before
# they are read whole (smaller ones cost less than the scan would save).
SCAN_FIRST_BYTES = 1 * limits.MiB
# Root envelopes one bundle may bring (an honest root is a few KiB).
MAX_BUNDLE_ROOT_BYTES = 16 * limits.MiB


def read_metadata(
    reader: Medium,
    trusted: TrustedRoot,
    history: dict[int, bytes],
    now: int | None,
    held: HeldEnvelopes | None = None,
) -> BundleMetadata:
    """Read and verify every root, release and request of the bundle (no writes).

    ``history`` holds the root envelopes the node accepted, by version;
    ``held`` finds the stored envelope a release patch applies to (None: the
    node holds none). Returns the verified metadata; raises the error of the
    first rule broken (see the module docstring).

    Two passes over the artifacts, so that no more than one unverified release
    is in memory at a time: the first reads the roots (and the request), the
    second -- under the rotated root -- reads, verifies and then checks each
    release in turn, its packs only once its manifest verified.
    """
    oci.parse_layout(reader.read("oci-layout", limits.OCI_LAYOUT_JSON_BUDGET.max_bytes))
    index = oci.parse_index(reader.read("index.json", limits.MAX_INDEX_BYTES))
    reads = _Reads(reader)
    roots: dict[int, bytes] = {}
    release_artifacts: list[oci.Descriptor] = []
    request: SiteRequest | None = None
    for d in index:
        reads.ref(d)
        art = reads.artifact(d)
        for layer in (*art.layers, art.config or oci.empty_descriptor()):
            reads.ref(layer)
        if art.artifact_type == oci.TRUST_ARTIFACT:
            for layer in art.layers:
                data = reads.root(layer)
                version = _root_version(data)
                if roots.setdefault(version, data) != data:
                    raise SchemaError(f"bundle holds two different roots v{version}")
        elif art.artifact_type == oci.RELEASE_ARTIFACT:
            release_artifacts.append(d)
        else:
            if request is not None:
                raise SchemaError("bundle holds two request documents")
            request = verify_any_request(
                reads.read(art.layers[0], limits.MAX_REQUEST_BYTES, "request")
            )
    if index:
        empty = oci.empty_descriptor()
        reader.read_blob(empty.digest, empty.size)

    trusted = trusted.walk(roots, now, history)

    meta = BundleMetadata(
        trusted, roots, request=request, referenced=reads.referenced, packed=reads.packed
    )
    seen: dict[tuple[str, int, str | None], VerifiedRelease] = {}
    kinds: dict[tuple[str, int], set[bool]] = {}  # universal or per-platform, per serial
    for d in release_artifacts:
        art = reads.artifact(d)
        rel = _verified_release(reads, art, trusted, now, held)
        if isinstance(rel, UnresolvedRelease):
            meta.unresolved.append(rel)
            continue
        man = rel.manifest
        kinds.setdefault((man.component, man.serial), set()).add(man.platform is None)
        twin = seen.setdefault((man.component, man.serial, man.platform), rel)
        if len(kinds[man.component, man.serial]) > 1:
            raise RollbackError(
                f"bundle offers {man.component} serial {man.serial} both universal and per platform"
            )
        if twin is rel:
            meta.releases.append(rel)
        elif twin.digest != rel.digest:
            raise RollbackError(
                f"bundle offers two different releases of {man.component} serial {man.serial}"
            )
        else:  # the same release listed twice: carry the union of its blobs
            twin.carried.update(rel.carried)
    return meta


def _verified_release(
    reads: _Reads,
    art: oci.Artifact,
    trusted: TrustedRoot,
    now: int | None,
    held: HeldEnvelopes | None,
) -> VerifiedRelease | UnresolvedRelease:
    """Verify the release ``art`` carries (rules 2b, 6-8): its envelope (whole
    or rebuilt), then -- only once that verified -- its packs and layers."""
    patch = oci.release_patch(art)
    if patch is None:
        data = reads.read(art.layers[0], limits.MAX_MANIFEST_BYTES, "release manifest")
    else:
        rebuilt = _rebuild_envelope(reads, art, patch, held)
        if isinstance(rebuilt, UnresolvedRelease):
            return rebuilt
        data = rebuilt
    man, env = trusted.verify_release(data, now)
    del data
    named = art.annotations.get(oci.ANNOTATION_COMPONENT)
    if named is not None and named != man.component:
        raise MixAndMatchError(
            f"bundle lists a release of {named!r} whose signed manifest is for {man.component!r}"
        )
    blobs = man.blob_sizes()
    for layer in art.layers[1:]:
        if layer.media_type == oci.PACK_MEDIA_TYPE:
            reads.pack(layer, blobs)
    carried = oci.check_release_layers(art, man, reads.packs)
    return VerifiedRelease(man, env, env.payload_digest(), carried)


def _shown(text: str) -> str:
    """An unsigned annotation as it may appear in a one-line message."""
    return text if text.isprintable() and len(text) <= 64 else repr(text[:64])


def _rebuild_envelope(
    reads: _Reads, art: oci.Artifact, patch: oci.ReleasePatch, held: HeldEnvelopes | None
) -> bytes | UnresolvedRelease:
    """Return the envelope ``art``'s release patch rebuilds (rule 2b), or what
    is missing when this node does not hold its base."""
    comp = art.annotations[oci.ANNOTATION_COMPONENT]  # parse_artifact requires it
    version = art.annotations.get(oci.ANNOTATION_VERSION, "?")
    blob = reads.read(art.layers[0], limits.MAX_MANIFEST_BYTES, "release patch")
    reads.charge(patch.result_size)
    what = f"{_shown(comp)} {_shown(version)}"
    base = None if held is None else held(comp, patch)
    if base is None:
        if patch.base_version is not None:
            have = f"{_shown(comp)} {_shown(patch.base_version)}"
        elif patch.base_serial is not None:
            have = f"{_shown(comp)} serial {patch.base_serial}"
        else:
            have = f"the {_shown(comp)} release {patch.base.hex()[:16]}"
        msg = (
            f"bundle was cut for a node holding {have}, which this node does not have "
            "(export it again for this node: --from-version its version, or --for its request)"
        )
        platform = art.annotations.get(oci.ANNOTATION_PLATFORM)
        if platform is not None and not ids.PLATFORM_RE.fullmatch(platform):
            platform = None
        return UnresolvedRelease(comp, what, msg, platform)
    return rebuild_envelope(base, blob, patch, what)


def rebuild_envelope(base: bytes, blob: bytes, patch: oci.ReleasePatch, what: str) -> bytes:
    """Return the envelope release patch ``blob`` makes from envelope ``base`` (rule 2b).

    ``what`` names the release in messages ("app 2.0"). Raises
    ``HashMismatchError`` when the patch does not apply or does not make the
    envelope it names. The caller checks ``sha256(base) == patch.base``.
    """
    try:
        if patch.media_type == oci.RELEASE_ZPATCH_MEDIA_TYPE:
            data = apply_dict_patch(base, blob, patch.result_size)
        else:
            data = apply_patch(base, blob, patch.result_size)
    except HashMismatchError as exc:
        raise HashMismatchError(
            f"bundle's release patch for {what} does not apply ({exc}): damaged or tampered"
        ) from None
    if ids.sha256(data) != patch.result:
        raise HashMismatchError(
            f"bundle's release patch for {what} does not rebuild the envelope it names "
            "(damaged or tampered)"
        )
    return data


DICT_PATCH_MAX_WINDOW = 1 << 27  # what an honest writer uses at most (128 MiB)


def apply_dict_patch(base: bytes, frame: bytes, size: int) -> bytes:
    """Return the zstd ``frame`` decoded with ``base`` as a raw-content dictionary.

    The frame must declare exactly ``size`` bytes (so no more is allocated),
    use a window of at most 128 MiB and be followed by nothing. Raises
    ``HashMismatchError`` otherwise, or for corrupt data.
    """
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != size:
            shown = "no size" if declared < 0 else f"{declared} bytes"
            raise HashMismatchError(f"zstd frame declares {shown}, the patch names {size}")
        d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        out = zstandard.ZstdDecompressor(
            dict_data=d, max_window_size=DICT_PATCH_MAX_WINDOW
        ).decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise HashMismatchError(f"corrupt zstd data: {exc}") from None
    if len(out) != size:
        raise HashMismatchError(f"zstd frame made {len(out)} bytes, the patch names {size}")
    return out


def _root_version(data: bytes) -> int:
    """The version an unverified root claims (decoded within ``limits.ROOT_BUDGET``)."""
    env = Envelope.decode(data, limits.MAX_ROOT_BYTES)
    return Root.from_value(encoding.decode(env.payload, budget=limits.ROOT_BUDGET)).version
