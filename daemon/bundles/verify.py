"""Read and verify every signed document of a bundle, in memory, before any write.

Theory of operation. ``read_metadata`` is steps 1-2 of the importer (see
importer.py): it reads the OCI metadata and the documents it points to
through a ``BundleReader`` (bounded, hash-checked, never through a link) and
applies the trust rules to all of them. It returns only what passed; any
failure raises, and since nothing here writes, a refused bundle leaves the node
untouched. Rules, one check each:

  1. ``oci-layout``/``index.json``/artifacts parse within their bounds ... RemoteProtocolError
  2. a blob's bytes hash to its name and size ............................ HashMismatchError
  2b. a release envelope carried as a patch: its base is an envelope the
     node stores (found by sha256, else the release is *unresolved*, see
     below); bspatch, or zstd with the base as dictionary, within the
     annotated size; the result hashes to the annotated sha256 ............ HashMismatchError
  2c. a pack parses within its bounds (``bundle.parse_pack``) and holds no
     blob twice; each entry is named by the sha256 of its bytes ........... SchemaError
  3. all metadata read stays under ``bundle.MAX_METADATA_BYTES`` ............ FrameTooLargeError
  4. a bundle root at a version the node holds is that root ............. (trust.walk)
  5. roots N+1, N+2... rotate from the pinned root ....................... (trust.walk)
  6. each release verifies under the resulting root, unexpired ........... (trust.verify_release)
  7. the artifact's component annotation matches the signed one ........ MixAndMatchError
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

from p2pupd.daemon.bundles.reader import BundleReader
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

    def __init__(self, reader: BundleReader) -> None:
        self.reader = reader
        self.referenced: dict[bytes, int] = {}
        self.spent = 0
        self.packs: dict[bytes, list[oci.PackEntry]] = {}  # by the pack's digest
        self.packed: dict[bytes, PackedBlob] = {}
        self.entries = 0

    def ref(self, d: oci.Descriptor) -> None:
        if self.referenced.setdefault(d.digest, d.size) != d.size:
            raise SchemaError(f"bundle names blob {d.digest.hex()[:16]} with two sizes")

    def read(self, d: oci.Descriptor, limit: int, what: str) -> bytes:
        if d.size > limit:
            raise FrameTooLargeError(f"bundle {what} of {d.size} bytes exceeds limit {limit}")
        self.spent += d.size
        if self.spent > oci.MAX_METADATA_BYTES:
            raise FrameTooLargeError(
                f"bundle metadata exceeds {oci.MAX_METADATA_BYTES // limits.MiB} MiB"
            )
        return self.reader.read_blob(d.digest, d.size)

    def pack(self, d: oci.Descriptor) -> None:
        """Read a pack once and learn its entries (rule 2c); its bytes are dropped."""
        if d.digest in self.packs:
            return
        data = self.read(d, oci.MAX_PACK_BYTES, "pack")
        try:
            entries = oci.pack_entries(data)
        except SchemaError as exc:
            raise SchemaError(f"bundle pack {d.digest.hex()[:16]}: {exc}") from None
        self.entries += len(entries)
        if self.entries > limits.MAX_BUNDLE_MEMBERS:
            raise SchemaError(f"bundle packs hold over {limits.MAX_BUNDLE_MEMBERS} blobs")
        self.packs[d.digest] = entries
        for e in entries:
            self.packed.setdefault(e.digest, PackedBlob(d.digest, d.size, e.offset, e.size))

    def charge(self, n: int) -> None:
        """Count ``n`` bytes built in memory (a rebuilt envelope) against rule 3."""
        self.spent += n
        if self.spent > oci.MAX_METADATA_BYTES:
            raise FrameTooLargeError(
                f"bundle metadata exceeds {oci.MAX_METADATA_BYTES // limits.MiB} MiB"
            )


def read_metadata(
    reader: BundleReader,
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
    """
    oci.parse_layout(reader.read("oci-layout", 4096))
    index = oci.parse_index(reader.read("index.json", limits.MAX_INDEX_BYTES))
    reads = _Reads(reader)
    roots: dict[int, bytes] = {}
    raw_releases: list[tuple[bytes, oci.Artifact]] = []
    raw_request: bytes | None = None
    unresolved: list[UnresolvedRelease] = []
    for d in index:
        reads.ref(d)
        art = oci.parse_artifact(reads.read(d, oci.MAX_ARTIFACT_BYTES, "artifact"))
        for layer in (*art.layers, art.config or oci.empty_descriptor()):
            reads.ref(layer)
        if art.artifact_type == oci.TRUST_ARTIFACT:
            for layer in art.layers:
                data = reads.read(layer, limits.MAX_ROOT_BYTES, "root")
                version = _root_version(data)
                if roots.setdefault(version, data) != data:
                    raise SchemaError(f"bundle holds two different roots v{version}")
        elif art.artifact_type == oci.RELEASE_ARTIFACT:
            patch = oci.release_patch(art)
            if patch is None:
                data = reads.read(art.layers[0], limits.MAX_MANIFEST_BYTES, "release manifest")
            else:
                rebuilt = _rebuild_envelope(reads, art, patch, held)
                if isinstance(rebuilt, UnresolvedRelease):
                    unresolved.append(rebuilt)
                    continue
                data = rebuilt
            for layer in art.layers[1:]:
                if layer.media_type == oci.PACK_MEDIA_TYPE:
                    reads.pack(layer)
            raw_releases.append((data, art))
        else:
            if raw_request is not None:
                raise SchemaError("bundle holds two request documents")
            raw_request = reads.read(art.layers[0], limits.MAX_REQUEST_BYTES, "request")
    if index:
        empty = oci.empty_descriptor()
        reader.read_blob(empty.digest, empty.size)

    trusted = trusted.walk(roots, now, history)

    meta = BundleMetadata(
        trusted, roots, referenced=reads.referenced, unresolved=unresolved, packed=reads.packed
    )
    seen: dict[tuple[str, int, str | None], VerifiedRelease] = {}
    kinds: dict[tuple[str, int], set[bool]] = {}  # universal or per-platform, per serial
    for data, art in raw_releases:
        man, env = trusted.verify_release(data, now)
        named = art.annotations.get(oci.ANNOTATION_COMPONENT)
        if named is not None and named != man.component:
            raise MixAndMatchError(
                f"bundle lists a release of {named!r} whose signed manifest is for {man.component!r}"
            )
        carried = oci.check_release_layers(art, man, reads.packs)
        rel = VerifiedRelease(man, env, env.payload_digest(), carried)
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
    if raw_request is not None:
        meta.request = verify_any_request(raw_request)
    return meta


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
        return UnresolvedRelease(comp, what, msg)
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
    env = Envelope.decode(data, limits.MAX_ROOT_BYTES)
    return Root.from_value(encoding.decode(env.payload, limits.MAX_ROOT_BYTES)).version
