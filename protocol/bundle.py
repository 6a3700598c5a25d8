"""The bundle format: an OCI image layout that carries p2pupd releases.

A bundle directory is a valid OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/<hex>``), so registry tools (oras, skopeo, crane) can copy it.
Each p2pupd document is an OCI artifact manifest referenced from ``index.json``:

* one *trust* artifact (``artifactType`` = ``TRUST_ARTIFACT``) whose layers are
  the root envelopes v1..vN, so a node at any older root can walk forward;
* one *release* artifact per release, whose first layer is the signed release
  envelope and whose other layers are the blobs (chunks, patches, hooks) the
  bundle carries for it.

Nothing here is trusted: an importer reads the OCI metadata only to find the
signed envelopes, verifies those against its pinned root, and then copies only
the blobs the *verified* manifest names. This module parses and builds the
JSON with every size, count and name bounded; it does no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import ids, limits
from .errors import CodecError, FrameTooLargeError, SchemaError

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
TRUST_ARTIFACT = "application/vnd.p2pupd.trust.v1"
RELEASE_ARTIFACT = "application/vnd.p2pupd.release.v1"
ROOT_MEDIA_TYPE = "application/vnd.p2pupd.root.v1+msgpack"
RELEASE_MEDIA_TYPE = "application/vnd.p2pupd.release.v1+msgpack"
CHUNK_MEDIA_TYPE = "application/vnd.p2pupd.chunk.v1"
PATCH_MEDIA_TYPE = "application/vnd.p2pupd.patch.v1+bsdiff4"
HOOK_MEDIA_TYPE = "application/wasm"
REQUEST_MEDIA_TYPE = "application/vnd.p2pupd.request.v1+msgpack"
BLOB_MEDIA_TYPES = (CHUNK_MEDIA_TYPE, PATCH_MEDIA_TYPE, HOOK_MEDIA_TYPE)
ANNOTATION_COMPONENT = "org.p2pupd.component"
ANNOTATION_VERSION = "org.p2pupd.version"
ANNOTATION_SERIAL = "org.p2pupd.serial"
ANNOTATION_ROOT_VERSION = "org.p2pupd.root.version"
MAX_ARTIFACT_BYTES = 256 * limits.MiB


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: bytes
    size: int
    annotations: dict[str, str]

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
class Artifact:
    """An OCI artifact manifest: its type and its layers."""

    artifact_type: str
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]


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


def build_index(manifests: list[Descriptor]) -> bytes:
    """Return the JSON bytes of ``index.json`` listing ``manifests``."""
    return _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [d.to_json() for d in manifests],
        }
    )


def _load_json(data: bytes, max_bytes: int, what: str) -> Any:
    if len(data) > max_bytes:
        raise FrameTooLargeError(f"{what} of {len(data)} bytes exceeds limit {max_bytes}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"{what} is not valid JSON: {exc}") from None


def parse_descriptor(v: Any, what: str) -> Descriptor:
    """Parse and bound one OCI descriptor; ``SchemaError`` on anything odd."""
    if not isinstance(v, dict):
        raise SchemaError(f"{what}: descriptor must be an object")
    mt, dg, size = v.get("mediaType"), v.get("digest"), v.get("size")
    if not isinstance(mt, str) or not 0 < len(mt) <= 255:
        raise SchemaError(f"{what}: bad mediaType")
    if not isinstance(dg, str) or not dg.startswith("sha256:"):
        raise SchemaError(f"{what}: digest must be sha256:<hex>")
    digest = ids.parse_hex_digest(dg[len("sha256:") :])
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or not 0 <= size <= limits.MAX_BLOB_BYTES
    ):
        raise SchemaError(f"{what}: size out of range")
    ann = v.get("annotations", {})
    if not isinstance(ann, dict) or len(ann) > 32:
        raise SchemaError(f"{what}: bad annotations")
    for k, a in ann.items():
        if not isinstance(k, str) or not isinstance(a, str) or len(k) > 255 or len(a) > 1024:
            raise SchemaError(f"{what}: bad annotation")
    return Descriptor(mt, digest, size, dict(ann))


def parse_index(data: bytes) -> list[Descriptor]:
    """Parse ``index.json``; return the descriptors of the artifacts it lists."""
    v = _load_json(data, limits.MAX_INDEX_BYTES, "index.json")
    if not isinstance(v, dict) or v.get("schemaVersion") != 2:
        raise SchemaError("index.json is not an OCI image index")
    mans = v.get("manifests")
    if not isinstance(mans, list) or len(mans) > 100_000:
        raise SchemaError("index.json manifests must be a bounded list")
    out = [parse_descriptor(m, "index.json") for m in mans]
    for d in out:
        if d.media_type != MANIFEST_MEDIA_TYPE:
            raise SchemaError(f"index.json lists unsupported media type {d.media_type!r:.60}")
        if d.size > MAX_ARTIFACT_BYTES:
            raise SchemaError("index.json lists an oversized artifact")
    return out


def parse_artifact(data: bytes) -> Artifact:
    """Parse an OCI artifact manifest naming p2pupd layers."""
    v = _load_json(data, MAX_ARTIFACT_BYTES, "artifact manifest")
    if not isinstance(v, dict) or v.get("schemaVersion") != 2:
        raise SchemaError("artifact is not an OCI image manifest")
    at = v.get("artifactType")
    if at not in (TRUST_ARTIFACT, RELEASE_ARTIFACT):
        raise SchemaError(f"unknown artifact type {at!r:.60}")
    layers_v = v.get("layers")
    if not isinstance(layers_v, list) or len(layers_v) > limits.MAX_BUNDLE_MEMBERS:
        raise SchemaError("artifact layers must be a bounded list")
    layers = tuple(parse_descriptor(x, "artifact layer") for x in layers_v)
    ann = v.get("annotations", {})
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in ann.items()
    ):
        raise SchemaError("artifact annotations must map text to text")
    if at == TRUST_ARTIFACT and not all(d.media_type == ROOT_MEDIA_TYPE for d in layers):
        raise SchemaError("trust artifact holds a non-root layer")
    if at == RELEASE_ARTIFACT:
        if not layers or layers[0].media_type != RELEASE_MEDIA_TYPE:
            raise SchemaError("release artifact must start with a release envelope")
        if not all(d.media_type in BLOB_MEDIA_TYPES for d in layers[1:]):
            raise SchemaError("release artifact holds a layer of unknown media type")
    return Artifact(str(at), layers, dict(ann))


def parse_layout(data: bytes) -> None:
    """Check the ``oci-layout`` marker file; ``SchemaError`` if it is not one."""
    v = _load_json(data, 4096, "oci-layout")
    if not isinstance(v, dict) or v.get("imageLayoutVersion") != "1.0.0":
        raise SchemaError("oci-layout is not an OCI image layout 1.0.0 marker")
