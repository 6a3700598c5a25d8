"""The bundle format: an OCI image layout that carries p2pupd releases.

A bundle directory is a valid OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/<hex>``), so registry tools (oras, skopeo, crane) can copy it.
Each p2pupd document is an OCI artifact manifest referenced from ``index.json``
(see docs/bundle-format.md for the full layout):

* at most one *trust* artifact (``artifactType`` = ``TRUST_ARTIFACT``) whose
  layers are root envelopes, so a node at an older root can walk forward;
* one *release* artifact per release, whose first layer is the signed release
  envelope -- whole, or as a patch against an envelope the receiving node
  already holds (``RELEASE_PATCH_MEDIA_TYPES``, see ``ReleasePatch``) -- and
  whose other layers are the blobs (chunks, patches, hooks) the bundle carries
  for it, the small ones gathered into *packs* (``PACK_MEDIA_TYPE``, see
  ``parse_pack``) so that a delta of a few hundred bytes does not cost a
  file and a ~180-byte descriptor of its own;
* at most one *request* artifact: the signed request file of the node the
  bundle was cut for (minimal bundles only).

``index.json`` names the bundle *format* in its annotations (``MAJOR.MINOR``,
see "the format version" below): a reader refuses a newer major format with
one line before it reads anything else, and a writer puts the oldest format
that can carry what the bundle holds, so older nodes keep importing sticks
that need nothing new -- among them the stick that carries their own update.

Every artifact's ``config`` is the OCI empty descriptor (``{}``), as the OCI
artifact guidance asks. Nothing here is trusted: an importer reads the OCI
metadata only to find the signed envelopes, verifies those against its pinned
root, and copies only blobs the *verified* manifests name -- a pack's entries
included, each identified by the sha256 of its bytes. This module parses and
builds the JSON and the packs with every size, count and name bounded; it does
no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pupd.protocol import ids, limits
from p2pupd.protocol.errors import CodecError, FrameTooLargeError, NewerFormatError, SchemaError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.varint import encode_uvarint, read_uvarint

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
TRUST_ARTIFACT = "application/vnd.p2pupd.trust.v1"
RELEASE_ARTIFACT = "application/vnd.p2pupd.release.v1"
REQUEST_ARTIFACT = "application/vnd.p2pupd.request.v1"
ARTIFACT_TYPES = (TRUST_ARTIFACT, RELEASE_ARTIFACT, REQUEST_ARTIFACT)
ROOT_MEDIA_TYPE = "application/vnd.p2pupd.root.v1+msgpack"
RELEASE_MEDIA_TYPE = "application/vnd.p2pupd.release.v1+msgpack"
# A release envelope as a patch against one the node holds: a bsdiff4 patch
# (the delta engine's PZB1 or BSDIFF40), or one zstd frame compressed with the
# base envelope as a raw-content dictionary ("+zstd"), whichever is smaller.
RELEASE_PATCH_MEDIA_TYPE = "application/vnd.p2pupd.release-patch.v1"
RELEASE_ZPATCH_MEDIA_TYPE = "application/vnd.p2pupd.release-patch.v1+zstd"
RELEASE_PATCH_MEDIA_TYPES = (RELEASE_PATCH_MEDIA_TYPE, RELEASE_ZPATCH_MEDIA_TYPE)
REQUEST_MEDIA_TYPE = "application/vnd.p2pupd.request.v1+msgpack"
CHUNK_MEDIA_TYPE = "application/vnd.p2pupd.chunk.v1"
ZCHUNK_MEDIA_TYPE = "application/vnd.p2pupd.chunk.v1+zstd"
PATCH_MEDIA_TYPE = "application/vnd.p2pupd.patch.v1+bsdiff4"
HOOK_MEDIA_TYPE = "application/wasm"
BLOB_MEDIA_TYPES = (CHUNK_MEDIA_TYPE, ZCHUNK_MEDIA_TYPE, PATCH_MEDIA_TYPE, HOOK_MEDIA_TYPE)
PACK_MEDIA_TYPE = "application/vnd.p2pupd.pack.v1"
ANNOTATION_COMPONENT = "org.p2pupd.component"
ANNOTATION_VERSION = "org.p2pupd.version"
ANNOTATION_SERIAL = "org.p2pupd.serial"
ANNOTATION_PLATFORM = "org.p2pupd.platform"  # informative: the signed manifest decides
ANNOTATION_ROOT_VERSION = "org.p2pupd.root.version"
ANNOTATION_NODE = "org.p2pupd.node"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# A release-patch layer: the envelope it applies to and the envelope it makes
# (sha256 of the encoded envelope bytes, and size). The base's serial and
# version are informative (for messages); the digests decide.
ANNOTATION_PATCH_BASE = "org.p2pupd.patch.base"
ANNOTATION_PATCH_RESULT = "org.p2pupd.patch.result"
ANNOTATION_PATCH_RESULT_SIZE = "org.p2pupd.patch.result.size"
ANNOTATION_PATCH_BASE_SERIAL = "org.p2pupd.patch.base.serial"
ANNOTATION_PATCH_BASE_VERSION = "org.p2pupd.patch.base.version"

# -- the format version ------------------------------------------------------
#
# A bundle's format is ``MAJOR.MINOR`` in index.json's annotations
# (``ANNOTATION_FORMAT``); a bundle without it is 1.0 (everything written
# before the marker existed). A new *major* format adds something an older
# reader would misread or refuse with a confusing error (a new artifact or
# layer media type, a new layout): a reader refuses a major newer than its
# own, first and with one line (``NewerFormatError``). A new *minor* format
# adds only what an older reader of the same major may ignore safely
# (informative annotations, say), so it is read. ``FORMAT_OF`` names the
# format that introduced each artifact type and media type; the writer puts
# the oldest format that can carry what its bundle holds (``format_needed``),
# never simply the newest it knows, so a stick that needs no new feature is
# read by every older node. ``ANNOTATION_WRITER`` ("p2pupd 0.2.0") is
# informative: it lets a refusal say which p2pupd wrote the bundle.
#
# Formats: 1.0 -- plain bundles (p2pupd 0.1.0 onwards; unmarked before the
# marker). 2.0 -- sealed bundles (protocol/site/sealed.py): the whole stick
# encrypted to a site, one artifact a 1.x reader does not know; the plain
# bundle inside keeps its own format.
BUNDLE_FORMAT = (2, 0)  # the newest format this code reads and writes
ANNOTATION_FORMAT = "org.p2pupd.bundle.format"
ANNOTATION_WRITER = "org.p2pupd.bundle.writer"
FORMAT_OF: dict[str, tuple[int, int]] = {
    name: (1, 0)
    for name in (
        *ARTIFACT_TYPES, ROOT_MEDIA_TYPE, RELEASE_MEDIA_TYPE, *RELEASE_PATCH_MEDIA_TYPES,
        REQUEST_MEDIA_TYPE, *BLOB_MEDIA_TYPES, PACK_MEDIA_TYPE, EMPTY_MEDIA_TYPE,
    )
}  # fmt: skip
_FORMAT_RE = re.compile(r"([1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})")

# Bounds of the OCI side (the signed documents have their own in ``limits``).
MAX_ARTIFACT_BYTES = limits.ARTIFACT_JSON_BUDGET.max_bytes  # a release listing ~500 k blobs
MAX_INDEX_ENTRIES = 4096  # artifacts listed by index.json
MAX_METADATA_BYTES = 1 * limits.GiB  # all artifacts and envelopes of one bundle, read in memory
MAX_ANNOTATIONS = 32
MAX_MEDIA_TYPE_CHARS = 255
MAX_ANNOTATION_KEY_CHARS = 255
MAX_ANNOTATION_VALUE_CHARS = 1024

# Packs: small blobs of one release in one blob (see ``parse_pack``). A pack is
# read whole into memory, so it and its entries are small; an entry is at most
# the minimum chunk size, so only deltas, zstd literals, small hooks, small
# files and the tail chunks of files are ever packed.
PACK_MAGIC = b"P2PK"
PACK_BLOB_MAX_BYTES = 16 * limits.KiB
MAX_PACK_BYTES = 4 * limits.MiB
MAX_PACK_ENTRIES = 16384
PACK_HEADER_MAX_BYTES = len(PACK_MAGIC) + 3  # magic and entry count (<= 16384: 3 bytes)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: bytes
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": "sha256:" + self.digest.hex(),
            "size": self.size,
        }
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))
        return d


@dataclass(frozen=True)
class ReleasePatch:
    """A release envelope carried as a patch against one the node holds.

    ``base`` and ``result`` are sha256 digests of *encoded envelopes* (the
    bytes a node stores, ``Envelope.encode()``), not payload digests. The
    patch only saves bytes: the rebuilt envelope is verified like a whole one.
    """

    base: bytes
    result: bytes
    result_size: int
    base_serial: int | None = None  # informative
    base_version: str | None = None  # informative
    media_type: str = RELEASE_PATCH_MEDIA_TYPE  # bsdiff4, or the zstd dictionary form

    def annotations(self) -> dict[str, str]:
        out = {
            ANNOTATION_PATCH_BASE: "sha256:" + self.base.hex(),
            ANNOTATION_PATCH_RESULT: "sha256:" + self.result.hex(),
            ANNOTATION_PATCH_RESULT_SIZE: str(self.result_size),
        }
        if self.base_serial is not None:
            out[ANNOTATION_PATCH_BASE_SERIAL] = str(self.base_serial)
        if self.base_version is not None:
            out[ANNOTATION_PATCH_BASE_VERSION] = self.base_version
        return out


@dataclass(frozen=True)
class PackEntry:
    """One blob in a pack: its sha256 (of its bytes: entries carry no name) and place."""

    digest: bytes
    offset: int
    size: int


@dataclass(frozen=True)
class Artifact:
    """An OCI artifact manifest: its type and its layers."""

    artifact_type: str
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    config: Descriptor | None = None

    def digests(self) -> set[bytes]:
        """Every blob this artifact references (config included)."""
        out = {d.digest for d in self.layers}
        out.add((self.config or empty_descriptor()).digest)
        return out


def _json_bytes(v: Any) -> bytes:
    return json.dumps(v, sort_keys=True, separators=(",", ":")).encode()


def empty_descriptor() -> Descriptor:
    return Descriptor(EMPTY_MEDIA_TYPE, ids.sha256(EMPTY_JSON), len(EMPTY_JSON), {})


def build_artifact(artifact: Artifact) -> bytes:
    """Return the JSON bytes of an OCI image manifest for ``artifact``."""
    return _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": artifact.artifact_type,
            "config": empty_descriptor().to_json(),
            "layers": [d.to_json() for d in artifact.layers],
            "annotations": dict(sorted(artifact.annotations.items())),
        }
    )


def build_index(
    manifests: list[Descriptor], fmt: tuple[int, int] = (1, 0), writer: str | None = None
) -> bytes:
    """Return the JSON bytes of ``index.json`` listing ``manifests``, marked as
    bundle format ``fmt`` (``format_needed``) written by ``writer`` (informative)."""
    ann = {ANNOTATION_FORMAT: format_text(fmt)}
    if writer is not None:
        ann[ANNOTATION_WRITER] = writer
    return _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [d.to_json() for d in manifests],
            "annotations": ann,
        }
    )


def format_text(fmt: tuple[int, int]) -> str:
    return f"{fmt[0]}.{fmt[1]}"


def format_needed(artifacts: Sequence[Artifact]) -> tuple[int, int]:
    """The oldest bundle format that can carry ``artifacts`` (their types and
    every layer's media type); ``ValueError`` for a type no format defines
    (a feature added without its ``FORMAT_OF`` entry)."""
    need = (1, 0)
    for art in artifacts:
        for name in (art.artifact_type, *(d.media_type for d in art.layers)):
            fmt = FORMAT_OF.get(name)
            if fmt is None:
                raise ValueError(f"no bundle format defines {name!r}: add it to FORMAT_OF")
            need = max(need, fmt)
    return need


def check_format(annotations: dict[str, str]) -> tuple[int, int]:
    """The format index.json's ``annotations`` declare (1.0 if none).

    Raises ``NewerFormatError`` for a major format newer than ``BUNDLE_FORMAT``
    (one line: the format, who wrote it, what to do) and ``SchemaError`` for a
    marker that is not ``MAJOR.MINOR``.
    """
    text = annotations.get(ANNOTATION_FORMAT)
    if text is None:
        return (1, 0)
    m = _FORMAT_RE.fullmatch(text)
    if m is None:
        raise SchemaError(f"index.json: bundle format {text!r:.40} is not MAJOR.MINOR")
    fmt = (int(m[1]), int(m[2]))
    if fmt[0] > BUNDLE_FORMAT[0]:
        writer = annotations.get(ANNOTATION_WRITER, "")
        by = f" (written by {writer!r:.60})" if writer else ""
        raise NewerFormatError(
            f"bundle format {format_text(fmt)}{by} is newer than this p2pupd reads "
            f"(formats up to {BUNDLE_FORMAT[0]}.x): update p2pupd on this node first, or "
            f"have the bundle cut without the newer features"
        )
    return fmt


def layer_media_types(man: Manifest) -> dict[bytes, str]:
    """Return the media type of each blob ``man`` names (chunks by default)."""
    out = {c.digest: CHUNK_MEDIA_TYPE for f in man.files for c in f.chunks}
    for d in man.deltas:
        out[d.patch] = ZCHUNK_MEDIA_TYPE if d.kind == "zchunk" else PATCH_MEDIA_TYPE
    for h in man.hooks.values():
        out[h.sha256] = HOOK_MEDIA_TYPE
    return out


def json_values_bound(data: bytes | memoryview) -> int:
    """An upper bound of the values and keys the JSON text ``data`` can hold.

    Every value but the first, and every object key, follows one of ``[``,
    ``{``, ``,`` or ``:`` (in a string they only make the bound looser), so
    this counts them -- four passes at C speed, no object built. Summing the
    bound over consecutive pieces of a document gives the bound of the whole.
    """
    b = bytes(data) if isinstance(data, memoryview) else data
    return 1 + b.count(b"[") + b.count(b"{") + b.count(b",") + b.count(b":")


def check_json_budget(data: bytes, budget: limits.JsonBudget) -> None:
    """Raise ``FrameTooLargeError`` if ``data`` could exceed ``budget`` when parsed."""
    if len(data) > budget.max_bytes:
        raise FrameTooLargeError(
            f"{budget.name} of {len(data)} bytes exceeds limit {budget.max_bytes}"
        )
    allowed = budget.values_allowed(len(data))
    if json_values_bound(data) > allowed:
        raise FrameTooLargeError(
            f"{budget.name} of {len(data)} bytes holds more than {allowed} JSON values (its limit)"
        )


def _no_number(text: str) -> Any:
    raise ValueError(f"number {text[:20]!r} is not an integer")


# Floats and NaN/Infinity have no place in OCI metadata: refused as they are
# met, before the parser builds anything more.
_JSON = json.JSONDecoder(parse_float=_no_number, parse_constant=_no_number)


def _load_json(data: bytes, budget: limits.JsonBudget) -> Any:
    check_json_budget(data, budget)
    try:
        return _JSON.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"{budget.name} is not valid JSON: {exc}") from None


def _annotations(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_ANNOTATIONS:
        raise SchemaError(f"{what}: annotations must be a map of at most {MAX_ANNOTATIONS}")
    for k, a in v.items():
        if (
            not isinstance(k, str)
            or not isinstance(a, str)
            or len(k) > MAX_ANNOTATION_KEY_CHARS
            or len(a) > MAX_ANNOTATION_VALUE_CHARS
        ):
            raise SchemaError(f"{what}: bad annotation")
    return dict(v)


def parse_descriptor(v: Any, what: str) -> Descriptor:
    """Parse and bound one OCI descriptor; ``SchemaError``/``CodecError`` on anything odd.

    The digest must be ``sha256:`` and 64 lowercase hex characters, so a name
    built from it can never hold ``/``, ``..`` or an absolute path.
    """
    if not isinstance(v, dict):
        raise SchemaError(f"{what}: descriptor must be an object")
    mt, dg, size = v.get("mediaType"), v.get("digest"), v.get("size")
    if not isinstance(mt, str) or not 0 < len(mt) <= MAX_MEDIA_TYPE_CHARS:
        raise SchemaError(f"{what}: bad mediaType")
    if not isinstance(dg, str) or not dg.startswith("sha256:"):
        raise SchemaError(f"{what}: digest must be sha256:<hex>, got {dg!r:.80}")
    try:
        digest = ids.parse_hex_digest(dg[len("sha256:") :])
    except CodecError as exc:
        raise SchemaError(f"{what}: {exc}") from None
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or not 0 <= size <= limits.MAX_BLOB_BYTES
    ):
        raise SchemaError(f"{what}: size out of range")
    return Descriptor(mt, digest, size, _annotations(v.get("annotations"), what))


def parse_index(data: bytes) -> list[Descriptor]:
    """Parse ``index.json``; return the descriptors of the artifacts it lists.

    Raises ``FrameTooLargeError`` beyond ``limits.INDEX_JSON_BUDGET``,
    ``NewerFormatError`` for a bundle format newer than this code reads
    (``check_format``), and ``SchemaError``/``CodecError`` for anything that is
    not a bounded OCI index of image manifests, each listed once.
    """
    v = _load_json(data, limits.INDEX_JSON_BUDGET)
    if not isinstance(v, dict) or v.get("schemaVersion") != 2:
        raise SchemaError("index.json is not an OCI image index")
    # The format first: a newer bundle may hold anything after this point.
    check_format(_annotations(v.get("annotations"), "index.json"))
    mans = v.get("manifests")
    if not isinstance(mans, list) or len(mans) > MAX_INDEX_ENTRIES:
        raise SchemaError(f"index.json must list at most {MAX_INDEX_ENTRIES} manifests")
    out = [parse_descriptor(m, "index.json") for m in mans]
    seen: set[bytes] = set()
    for d in out:
        if d.media_type != MANIFEST_MEDIA_TYPE:
            raise SchemaError(f"index.json lists unsupported media type {d.media_type!r:.60}")
        if d.size > MAX_ARTIFACT_BYTES:
            raise SchemaError("index.json lists an oversized artifact")
        if d.digest in seen:
            raise SchemaError(f"index.json lists artifact {d.digest.hex()[:16]} twice")
        seen.add(d.digest)
    return out


def parse_artifact(data: bytes) -> Artifact:
    """Parse an OCI artifact manifest naming p2pupd layers.

    Raises ``FrameTooLargeError`` beyond ``limits.ARTIFACT_JSON_BUDGET`` and
    ``SchemaError``/``CodecError`` for an unknown artifact type, a
    config other than the empty descriptor, a layer of the wrong media type or
    listed twice, or any field out of bounds.
    """
    v = _load_json(data, limits.ARTIFACT_JSON_BUDGET)
    if not isinstance(v, dict) or v.get("schemaVersion") != 2:
        raise SchemaError("artifact is not an OCI image manifest")
    at = v.get("artifactType")
    if at not in ARTIFACT_TYPES:
        raise SchemaError(f"unknown artifact type {at!r:.60}")
    config = parse_descriptor(v.get("config"), "artifact config")
    if config != empty_descriptor():
        raise SchemaError("artifact config must be the OCI empty descriptor")
    layers_v = v.get("layers")
    if not isinstance(layers_v, list) or len(layers_v) > limits.MAX_BUNDLE_MEMBERS:
        raise SchemaError("artifact layers must be a bounded list")
    layers = tuple(parse_descriptor(x, "artifact layer") for x in layers_v)
    if len({d.digest for d in layers}) != len(layers):
        raise SchemaError("artifact lists a layer twice")
    ann = _annotations(v.get("annotations"), "artifact")
    if at == TRUST_ARTIFACT and not all(d.media_type == ROOT_MEDIA_TYPE for d in layers):
        raise SchemaError("trust artifact holds a non-root layer")
    if at == REQUEST_ARTIFACT and (len(layers) != 1 or layers[0].media_type != REQUEST_MEDIA_TYPE):
        raise SchemaError("request artifact must hold exactly one request document")
    if at == RELEASE_ARTIFACT:
        first = layers[0].media_type if layers else None
        if first != RELEASE_MEDIA_TYPE and first not in RELEASE_PATCH_MEDIA_TYPES:
            raise SchemaError("release artifact must start with a release envelope")
        if first in RELEASE_PATCH_MEDIA_TYPES:
            parse_release_patch(layers[0])
            if not ann.get(ANNOTATION_COMPONENT):
                raise SchemaError("release artifact with a release patch must name its component")
        for d in layers[1:]:
            if d.media_type == PACK_MEDIA_TYPE:
                if not 0 < d.size <= MAX_PACK_BYTES:
                    raise SchemaError(f"pack of {d.size} bytes is out of bounds")
            elif d.media_type not in BLOB_MEDIA_TYPES:
                raise SchemaError("release artifact holds a layer of unknown media type")
    return Artifact(str(at), layers, ann, config)


def _sha256_annotation(ann: dict[str, str], key: str) -> bytes:
    v = ann.get(key)
    if v is None or not v.startswith("sha256:"):
        raise SchemaError(f"release patch: {key} must be sha256:<hex>")
    try:
        return ids.parse_hex_digest(v[len("sha256:") :])
    except CodecError as exc:
        raise SchemaError(f"release patch: {key}: {exc}") from None


def _decimal(v: str, key: str, lo: int, hi: int) -> int:
    if not (0 < len(v) <= 20 and v.isascii() and v.isdigit()):
        raise SchemaError(f"release patch: {key} is not a decimal number")
    n = int(v)
    if not lo <= n <= hi:
        raise SchemaError(f"release patch: {key} {n} is out of range [{lo}, {hi}]")
    return n


def parse_release_patch(d: Descriptor) -> ReleasePatch:
    """Parse and bound a release-patch layer's annotations; ``SchemaError`` if odd.

    The patch itself and the envelope it makes are each at most
    ``limits.MAX_MANIFEST_BYTES``.
    """
    if d.media_type not in RELEASE_PATCH_MEDIA_TYPES:
        raise SchemaError("not a release patch layer")
    if not 0 < d.size <= limits.MAX_MANIFEST_BYTES:
        raise SchemaError(f"release patch of {d.size} bytes is out of bounds")
    ann = d.annotations
    base = _sha256_annotation(ann, ANNOTATION_PATCH_BASE)
    result = _sha256_annotation(ann, ANNOTATION_PATCH_RESULT)
    size_v = ann.get(ANNOTATION_PATCH_RESULT_SIZE)
    if size_v is None:
        raise SchemaError(f"release patch: {ANNOTATION_PATCH_RESULT_SIZE} is missing")
    size = _decimal(size_v, ANNOTATION_PATCH_RESULT_SIZE, 1, limits.MAX_MANIFEST_BYTES)
    serial_v = ann.get(ANNOTATION_PATCH_BASE_SERIAL)
    serial = (
        None if serial_v is None else _decimal(serial_v, ANNOTATION_PATCH_BASE_SERIAL, 0, 2**63 - 1)
    )
    version = ann.get(ANNOTATION_PATCH_BASE_VERSION)
    if version is not None and (
        len(version.encode()) > limits.MAX_VERSION_LABEL_BYTES or not version.isprintable()
    ):
        raise SchemaError(f"release patch: bad {ANNOTATION_PATCH_BASE_VERSION}")
    return ReleasePatch(base, result, size, serial, version, d.media_type)


def release_patch(art: Artifact) -> ReleasePatch | None:
    """Return the release patch ``art`` carries instead of its envelope, if any."""
    if art.artifact_type != RELEASE_ARTIFACT or not art.layers:
        return None
    first = art.layers[0]
    return parse_release_patch(first) if first.media_type in RELEASE_PATCH_MEDIA_TYPES else None


def parse_layout(data: bytes) -> None:
    """Check the ``oci-layout`` marker file; ``SchemaError`` if it is not one."""
    v = _load_json(data, limits.OCI_LAYOUT_JSON_BUDGET)
    if not isinstance(v, dict) or v.get("imageLayoutVersion") != "1.0.0":
        raise SchemaError("oci-layout is not an OCI image layout 1.0.0 marker")


def check_release_layers(
    art: Artifact, man: Manifest, packs: Mapping[bytes, Sequence[PackEntry]] | None = None
) -> dict[bytes, int]:
    """Return {digest: size} of the blobs ``art`` carries for the verified ``man``.

    ``packs`` gives the entries of each pack layer, by the pack's digest
    (``pack_entries``). The artifact is unsigned, so each layer
    after the envelope, and each entry of a pack layer, must be a blob the
    signed manifest names, with the size it gives, carried once; ``SchemaError``
    if not.
    """
    named = man.blob_sizes()
    out: dict[bytes, int] = {}

    def carry(digest: bytes, size: int, where: str) -> None:
        want = named.get(digest)
        if want is None:
            raise SchemaError(
                f"bundle {where} {digest.hex()[:16]} is not part of the signed release "
                f"{man.component} {man.version}"
            )
        if want != size:
            raise SchemaError(
                f"bundle {where} {digest.hex()[:16]} claims {size} bytes, "
                f"the signed release says {want}"
            )
        if digest in out:
            raise SchemaError(f"bundle carries blob {digest.hex()[:16]} twice for one release")
        out[digest] = size

    for d in art.layers[1:]:
        if d.media_type != PACK_MEDIA_TYPE:
            carry(d.digest, d.size, "layer")
            continue
        entries = (packs or {}).get(d.digest)
        if entries is None:
            raise SchemaError(f"bundle pack {d.digest.hex()[:16]} was not read")
        for e in entries:
            carry(e.digest, e.size, "pack entry")
    return out


# -- packs ---------------------------------------------------------------------------
#
#   "P2PK" | uvarint n | n x uvarint size | the n blobs' bytes, back to back
#
# Offsets are implied by the sizes, so entries can neither overlap nor leave a
# gap, and the sizes must add up to the rest of the pack exactly. An entry has
# no name of its own: it is the blob whose sha256 its bytes have, and it counts
# only if a verified manifest names that digest at that size. Writing 32 bytes
# of name per entry would repeat what the bytes already say (and what the
# artifact's digest of the whole pack already seals), and on a bundle of a
# few small deltas those names would be a tenth of its size.


def build_pack(blobs: Sequence[bytes]) -> bytes:
    """Return a pack of ``blobs`` (order kept); ``ValueError`` beyond the pack bounds."""
    if not 0 < len(blobs) <= MAX_PACK_ENTRIES:
        raise ValueError(f"a pack holds 1..{MAX_PACK_ENTRIES} blobs, not {len(blobs)}")
    if any(len(b) > PACK_BLOB_MAX_BYTES for b in blobs):
        raise ValueError(f"a packed blob is at most {PACK_BLOB_MAX_BYTES} bytes")
    out = b"".join([PACK_MAGIC, _uvarint(len(blobs)), *(_uvarint(len(b)) for b in blobs), *blobs])
    if len(out) > MAX_PACK_BYTES:
        raise ValueError(f"a pack is at most {MAX_PACK_BYTES} bytes")
    return out


def packed_bytes(size: int) -> int:
    """Bytes a blob of ``size`` takes in a pack: itself and its size field."""
    return size + len(_uvarint(size))


def parse_pack(data: bytes, max_entries: int = MAX_PACK_ENTRIES) -> list[tuple[int, int]]:
    """Return (offset, size) of each entry of the pack ``data``, in order.

    Raises ``SchemaError`` for a pack over ``MAX_PACK_BYTES``, a wrong magic,
    a truncated or overlong header, more than ``max_entries`` (at most
    ``MAX_PACK_ENTRIES``) entries, an entry over ``PACK_BLOB_MAX_BYTES``, or
    sizes that do not add up to the bytes that follow the header exactly.
    """
    if len(data) > MAX_PACK_BYTES:
        raise SchemaError(f"pack of {len(data)} bytes exceeds limit {MAX_PACK_BYTES}")
    if data[: len(PACK_MAGIC)] != PACK_MAGIC:
        raise SchemaError("pack does not start with the pack magic")
    n, pos = _read_uvarint(data, len(PACK_MAGIC))
    if not 0 < n <= MAX_PACK_ENTRIES:
        raise SchemaError(f"pack lists {n} entries, limit 1..{MAX_PACK_ENTRIES}")
    if n > max_entries:
        raise SchemaError(f"pack lists {n} entries, more than the {max_entries} blobs it may hold")
    if n > len(data) - pos:  # each entry needs at least its one-byte size field
        raise SchemaError(f"pack header is truncated: {n} entries in {len(data) - pos} bytes")
    sizes = []
    for _ in range(n):
        size, pos = _read_uvarint(data, pos)
        if size > PACK_BLOB_MAX_BYTES:
            raise SchemaError(f"pack entry of {size} bytes exceeds limit {PACK_BLOB_MAX_BYTES}")
        sizes.append(size)
    if sum(sizes) != len(data) - pos:
        raise SchemaError(
            f"pack entries add up to {sum(sizes)} bytes, the pack holds {len(data) - pos}"
        )
    out = []
    for size in sizes:
        out.append((pos, size))
        pos += size
    return out


def pack_entries(data: bytes, named: Mapping[bytes, int] | None = None) -> list[PackEntry]:
    """Return the entries of the pack ``data``, each named by its sha256.

    ``named``, the {digest: size} of the blobs a *verified* manifest names,
    bounds the work up front: a pack listing more entries than that is
    refused from its header, and each entry is checked as it is hashed, so
    the first entry that is not such a blob ends the parse (a pack of
    thousands of tiny made-up entries costs one hash). Raises ``parse_pack``'s
    errors, and ``SchemaError`` for a blob in the pack twice or not named.
    """
    spans = parse_pack(data, MAX_PACK_ENTRIES if named is None else len(named))
    view = memoryview(data)
    out: list[PackEntry] = []
    seen: set[bytes] = set()
    for o, n in spans:
        digest = hashlib.sha256(view[o : o + n]).digest()
        if named is not None and named.get(digest) != n:
            raise SchemaError(
                f"pack entry {digest.hex()[:16]} ({n} bytes) is not part of the signed release"
            )
        if digest in seen:
            raise SchemaError("pack holds one blob twice")
        seen.add(digest)
        out.append(PackEntry(digest, o, n))
    return out


def _uvarint(n: int) -> bytes:
    return encode_uvarint(n)


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    # No honest header field needs more than 4 bytes (sizes <= 16 KiB,
    # counts <= 16384): a longer varint is refused, not accumulated.
    return read_uvarint(data, pos, 4, "pack header")
